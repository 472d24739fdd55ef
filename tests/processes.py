"""The gateway as a separate process (``python -m invalgw run --config FILE``), for tests that
kill it, signal it, or need it to run on its own while the test process does something else.

Each process logs to a file (never a pipe, which would fill and block it). Readiness is the log
line the gateway writes once every stage has started. :class:`Processes` stops whatever is still
running when the test ends, passed or failed; the logs are attached to a failing test's report.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from invalgw.config import RegionConfig
from invalgw.proto import entry_fields

READY_TEXT = "running: "
"""Logged by the gateway when every stage has started (``gateway <region> running: …``)."""


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGKILL the child if the test process dies, so nothing outlives a crashed run."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class GatewayProcess:
    """One ``python -m invalgw run`` child process for one region."""

    def __init__(self, name: str, config: RegionConfig, workdir: Path) -> None:
        self.name = name
        from tests.conftest import write_config  # conftest imports this module

        self.config = config
        self.config_path = write_config(workdir / f"{name}.toml", config)
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, *, log_level: str = "info") -> GatewayProcess:
        """Start the process; call :meth:`wait_ready` before relying on it."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "--log-level",
                    log_level,
                    "run",
                    "--config",
                    str(self.config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        """Everything the process logged since its last start."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def wait_for_log(self, text: str, *, seconds: float = 15.0) -> None:
        """Wait until the log holds ``text``; fail with the log if the process exits first."""
        deadline = time.monotonic() + seconds
        while text not in self.log():
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"gateway {self.name} exited with {self.process.returncode} before logging "
                    f"{text!r}:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"gateway {self.name} did not log {text!r} in {seconds}s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.02)

    def wait_ready(self, *, seconds: float = 15.0) -> GatewayProcess:
        self.wait_for_log(READY_TEXT, seconds=seconds)
        return self

    def send(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no drain, no acknowledgement, nothing flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait(self, *, seconds: float = 15.0) -> int:
        """Wait for the process to exit; its exit status (128 + n when killed by signal n)."""
        assert self.process is not None
        try:
            code = self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"gateway {self.name} still running after {seconds}s:\n{self.log()[-3000:]}"
            ) from None
        return code if code >= 0 else 128 - code

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within a few seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Processes:
    """The gateway processes of one test; :meth:`close` stops every one still running."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.all: list[GatewayProcess] = []

    def add(self, name: str, config: RegionConfig) -> GatewayProcess:
        process = GatewayProcess(name, config, self.workdir)
        self.all.append(process)
        return process

    def start_all(self, configs: dict[str, RegionConfig]) -> dict[str, GatewayProcess]:
        """Start one gateway per region (in parallel) and wait until each is ready."""
        started = {name: self.add(name, config).start() for name, config in configs.items()}
        for process in started.values():
            process.wait_ready()
        return started

    def close(self) -> None:
        for process in self.all:
            process.stop()

    def logs(self) -> list[tuple[str, str]]:
        return [(process.name, process.log()[-6000:]) for process in self.all]


def sync_client(config: RegionConfig) -> redis.Redis:
    """A blocking test client for a region's Redis (the test process is not the gateway)."""
    client: redis.Redis = redis.Redis.from_url(
        config.redis.url,
        socket_timeout=5,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
    return client


def wait_for(condition: Callable[[], bool], *, seconds: float = 15.0, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.02)


def write_burst(client: redis.Redis, stream: str, keys: Sequence[str], *, chunk: int = 1000) -> int:
    """One invalidation per key, XADDed in pipelined chunks; returns how many were written."""
    for start in range(0, len(keys), chunk):
        with client.pipeline(transaction=False) as pipe:
            for key in keys[start : start + chunk]:
                pipe.xadd(stream, entry_fields([key]))  # type: ignore[arg-type]
            pipe.execute()
    return len(keys)


def cache_keys(clients: Iterable[redis.Redis], keys: Sequence[str], *, chunk: int = 5000) -> None:
    """SET every key in every region, so that the test can see them go."""
    for client in clients:
        for start in range(0, len(keys), chunk):
            client.mset(dict.fromkeys(keys[start : start + chunk], b"cached"))


def all_gone(client: redis.Redis, keys: Sequence[str], *, chunk: int = 5000) -> bool:
    """None of ``keys`` exists any more."""
    return not any(
        int(client.exists(*keys[start : start + chunk])) for start in range(0, len(keys), chunk)
    )


def groups(client: redis.Redis, stream: str) -> dict[str, dict[str, Any]]:
    """XINFO GROUPS of ``stream`` by group name ({} when the stream does not exist)."""
    try:
        infos = client.xinfo_groups(stream)
    except redis.ResponseError:
        return {}
    return {info["name"].decode(): info for info in infos}


def settled(client: redis.Redis, stream: str) -> bool:
    """Every group of ``stream`` has read everything and acknowledged it."""
    infos = groups(client, stream)
    return bool(infos) and all(
        info["pending"] == 0 and info.get("lag") == 0 for info in infos.values()
    )
