"""Real Redis servers for the tests: testcontainers when a Docker engine answers, else local
``redis-server`` processes on free ports (never the developer's own Redis on 6379)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from invalgw.dev.localredis import RedisProcess
from tests.processes import die_with_parent


def no_retry() -> Retry:
    """Tests' own clients retry nothing: a test that needs a retry says so."""
    return Retry(NoBackoff(), 0)


def docker_available() -> bool:
    if os.environ.get("INVALGW_TESTS_NO_DOCKER"):
        return False
    if not (os.path.exists("/var/run/docker.sock") or os.environ.get("DOCKER_HOST")):
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
    except Exception:
        return False
    return True


@dataclass
class RedisServer:
    """One running server; ``restart`` brings it back empty on the same port."""

    port: int
    _process: RedisProcess | None = None
    _container: Any = None
    args: tuple[str, ...] = field(default=())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """Stop the server abruptly; everything it held is lost (nothing is persisted)."""
        if self._process is not None:
            self._process.kill()
        else:
            self._container.get_wrapped_container().kill()

    def restart(self) -> None:
        """Start it again on the same port, empty."""
        if self._process is not None:
            self._process.start()
        else:
            self._container.get_wrapped_container().start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, no command gets an answer."""
        if self._process is not None:
            assert self._process.process is not None
            self._process.process.send_signal(signal.SIGSTOP)
        else:
            self._container.get_wrapped_container().pause()

    def resume(self) -> None:
        if self._process is not None:
            assert self._process.process is not None
            self._process.process.send_signal(signal.SIGCONT)
        else:
            self._container.get_wrapped_container().unpause()

    def stop(self) -> None:
        if self._process is not None:
            self._process.cleanup()
        else:
            self._container.stop()


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
    if docker_available():
        from testcontainers.redis import RedisContainer

        container = RedisContainer("redis:7").with_command(
            " ".join(["redis-server", "--save", "''", "--appendonly", "no", *args])
        )
        container.start()
        port = int(container.get_exposed_port(6379))
        return RedisServer(port=port, _container=container, args=args)
    process = RedisProcess(args=args, preexec=die_with_parent).start()
    return RedisServer(port=process.port, _process=process, args=args)
