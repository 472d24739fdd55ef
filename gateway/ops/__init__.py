"""Operator tools on top of the service: the lag table (``invalgw lag``) and the probe.

They read what the gateways publish in Redis and never run a stage; the service never imports them.
"""
