"""Errors the gateway reports to its operator. Each class is one failure mode."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A region config file is missing, unreadable or invalid.

    ``problems`` holds one line per problem, each naming the file, the field and what is wrong.
    The operator fixes the file; ``invalgw check --config FILE`` shows the same lines.
    """

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {problem}" for problem in problems))


class RedisUnreachable(GatewayError):
    """A Redis named in the config did not answer (refused, timed out, wrong password, TLS).

    The message names the region and the URL (without its password). Check the address, the
    credentials and that the network allows the connection.
    """


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
