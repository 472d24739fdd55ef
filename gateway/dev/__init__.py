"""Local rehearsal tools: the demo, the benchmark and its baselines, a local Redis launcher and a
loopback WAN proxy. For trying the gateway on one machine; the service never imports them.
"""
