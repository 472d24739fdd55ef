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
