"""Local ``redis-server`` processes, for the demo, the benchmark and the tests.

Each server keeps nothing on disk (no RDB, no AOF) and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from invalgw.dev.errors import RedisNotInstalled

INSTALL_HINT = (
    "redis-server was not found on PATH. Install Redis first: "
    "Debian/Ubuntu `sudo apt-get install redis-server`, Fedora `sudo dnf install redis`, "
    "macOS `brew install redis`; or set INVALGW_REDIS_SERVER to the binary."
)


def find_redis_server() -> str:
    """Path of the redis-server binary; raises :class:`RedisNotInstalled` with install help."""
    configured = os.environ.get("INVALGW_REDIS_SERVER")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise RedisNotInstalled(f"INVALGW_REDIS_SERVER={configured} is not an executable file")
        return configured
    found = shutil.which("redis-server")
    if found is None:
        raise RedisNotInstalled(INSTALL_HINT)
    return found


FREE_PORTS = range(20_000, 32_000)
"""Where free ports are looked for: below Linux's ephemeral range (32768-60999), so a port found
free is not taken a moment later by some process's outgoing connection."""


def free_port(ports: range = FREE_PORTS) -> int:
    """A port nothing listens on or is bound to on 127.0.0.1 right now."""
    for _ in range(200):
        port = random.choice(ports)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise OSError(f"no free port found in {ports.start}-{ports.stop - 1}")


class PortTaken(RuntimeError):
    """redis-server could not listen: its port was taken by another process."""


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RedisProcess:
    """One redis-server child process on 127.0.0.1:``port``."""

    def __init__(
        self,
        port: int | None = None,
        *,
        workdir: str | os.PathLike[str] | None = None,
        args: tuple[str, ...] = (),
        own_session: bool = False,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        """``own_session``: start the server in a session of its own, so a Ctrl-C in the
        terminal reaches only this process, which then stops the server in its own time."""
        self.binary = find_redis_server()
        self._auto_port = port is None
        self.port = port or free_port()
        self.args = args
        self.own_session = own_session
        self.preexec = preexec
        """Run in the child before exec (tests: die with the test process)."""
        self._own_dir = workdir is None
        # absolute: redis-server changes into --dir before it opens --logfile
        self.workdir = Path(
            workdir or tempfile.mkdtemp(prefix=f"invalgw-redis-{self.port}-")
        ).absolute()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def logfile(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        """Start the server and wait until it answers. A port picked by :func:`free_port` that
        was taken in the meantime is swapped for another, a few times."""
        for attempt in range(5):
            try:
                return self._start(timeout_s)
            except PortTaken:
                if not self._auto_port or attempt == 4:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout_s: float) -> RedisProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.logfile),
            "--daemonize",
            "no",
            *self.args,
        ]
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            start_new_session=self.own_session,
            preexec_fn=self.preexec,
        )
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()  # never leave a server behind that the caller does not know is running
            raise
        return self

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        client = redis.Redis(
            port=self.port,
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    log = self.logfile.read_text() if self.logfile.exists() else ""
                    failure = PortTaken if "Address already in use" in log else RuntimeError
                    raise failure(f"redis-server on port {self.port} exited: {log[-2000:]}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: the server loses everything it held (nothing is persisted)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
