"""Errors of the local rehearsal tools (demo, benchmark), reported like the gateway's own."""

from __future__ import annotations

from invalgw.errors import GatewayError


class RedisNotInstalled(GatewayError):
    """``redis-server`` is not on PATH, so the demo and the benchmark cannot start regions.

    Install it (Debian/Ubuntu: ``apt-get install redis-server``; macOS: ``brew install redis``)
    or point ``INVALGW_REDIS_SERVER`` at the binary.
    """


class PortInUse(GatewayError):
    """A port the demo or the benchmark needs is already taken on this machine.

    The message names the region file and the port. Stop what listens there (often a demo
    still running in another terminal, or a Redis of your own), or move the ports with
    ``invalgw demo --port-base PORT``.
    """


class DemoFailed(GatewayError):
    """A process of the local demo (a redis-server or a gateway) could not start or died.

    The message names the region and the log file to read; everything the demo started has
    been stopped.
    """
