"""Real Redis servers for the tests: local ``redis-server`` processes on free ports (never the
developer's own Redis on 6379).

Not containers: the suite runs where no Docker engine does (CI here), and a process restarted on
its own port is exactly the "Redis came back" case the tests need (a container restart may be
given another host port)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from invalgw.dev.localredis import RedisProcess
from tests.processes import die_with_parent


def no_retry() -> Retry:
    """Tests' own clients retry nothing: a test that needs a retry says so."""
    return Retry(NoBackoff(), 0)


@dataclass
class RedisServer:
    """One running server; ``restart`` brings it back on the same port (empty, unless its
    ``args`` make it persist)."""

    process: RedisProcess
    args: tuple[str, ...] = field(default=())

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """Stop the server abruptly; what it had not persisted is lost."""
        self.process.kill()

    def terminate(self) -> None:
        """Stop the server gracefully (SIGTERM: it writes what its ``args`` persist)."""
        self.process.stop()

    def restart(self) -> None:
        """Start it again on the same port."""
        self.process.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, no command gets an answer."""
        assert self.process.process is not None
        self.process.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process.process is not None
        self.process.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.process.cleanup()


def async_client(
    url: str, username: str | None = None, password: str | None = None
) -> redis.asyncio.Redis:
    """A test's own client: timeouts, no retries (a test sees each failure)."""
    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=5,
        socket_connect_timeout=2,
        retry=no_retry(),
        username=username,
        password=password,
    )


@contextlib.contextmanager
def redis_servers(count: int, *args: str) -> Iterator[list[RedisServer]]:
    servers: list[RedisServer] = []
    try:
        servers.extend(_start(args) for _ in range(count))
        yield servers
    finally:
        for server in servers:
            server.stop()


def _start(args: tuple[str, ...]) -> RedisServer:
    process = RedisProcess(args=args, preexec=die_with_parent).start()
    return RedisServer(process=process, args=args)
