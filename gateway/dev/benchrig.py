"""The local regions one ``invalgw bench`` run uses, and their clean-up.

A :class:`Mesh` is one run: 2-5 fresh ``redis-server`` processes on free ports, a loopback WAN
proxy (``invalgw wan-proxy``) in front of each when the run has a delay, one region file each, and
the system under test as separate OS processes, one per region: gateways (``python -m invalgw
run``), batched forwarders (:mod:`invalgw.dev.batched`) or naive ones (:mod:`invalgw.dev.naive`).
Every child runs in its own session, so a Ctrl-C reaches only the bench, which then stops each
child it started (SIGTERM, then SIGKILL) and each server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

import redis

from invalgw.dev.localredis import RedisProcess, find_redis_server, free_port, port_in_use
from invalgw.names import APPLY_GROUP, Names, forward_group

log = logging.getLogger(__name__)

REGIONS = ("us-east", "eu-west", "ap-south", "us-west", "eu-north")
"""Region names, in the order a run takes them; the first is the origin of one-origin runs."""
NAMESPACE = "bench"
STREAM = "bench:invalidations"
GATEWAY = "gateway"
BATCHED = "batched"
NAIVE = "naive"
SYSTEMS = (GATEWAY, BATCHED, NAIVE)
LEASE_MS = 3000
"""Partition lease TTL in partitioned runs: rebalancing to a second process takes a few rounds
of a third of it each."""
_BASELINE_MODULES = {BATCHED: "invalgw.dev.batched", NAIVE: "invalgw.dev.naive"}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_server_version() -> tuple[int, ...]:
    out = subprocess.run(
        [find_redis_server(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else (0, 0, 0)


def region_toml(
    region: str,
    ports: dict[str, int],
    *,
    batch_size: int | None = None,
    peer_ports: dict[str, int] | None = None,
    partitions: int = 1,
    consumer: str = "bench",
) -> str:
    """A region file for the bench: defaults everywhere but names, addresses and consumer.
    ``peer_ports``: where this region reaches each peer (a WAN proxy), if not at its Redis;
    ``partitions``: of every region's stream (the lease then runs on a short TTL, so a
    second process gets its share within a couple of seconds)."""
    peer_ports = peer_ports or ports
    lines = [
        f'region = "{region}"',
        "",
        "[redis]",
        f'url = "redis://127.0.0.1:{ports[region]}/0"',
        "",
        "[streams]",
        f'namespace = "{NAMESPACE}"',
        f'local = "{STREAM}"',
        f"partitions = {partitions}",
        "",
        "[gateway]",
        f'consumer = "{consumer}"',
    ]
    if partitions > 1:
        lines.append(f"lease_ms = {LEASE_MS}")
    if batch_size is not None:
        lines.append(f"batch_size = {batch_size}")
    for peer in ports:
        if peer != region:
            lines += [
                "",
                "[[peers]]",
                f'name = "{peer}"',
                f'url = "redis://127.0.0.1:{peer_ports[peer]}/0"',
                f"partitions = {partitions}",
            ]
    return "\n".join(lines) + "\n"


class Child:
    """One child process of the bench, its output in a log file."""

    def __init__(self, name: str, argv: list[str], logfile: Path, *, stdout_pipe: bool = False):
        self.name = name
        self.measured = True
        """Whether its CPU time counts (the load's own processes do not)."""
        self.logfile = logfile
        self._log = logfile.open("wb")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            start_new_session=True,
        )

    @property
    def stdout(self) -> IO[bytes]:
        assert self.process.stdout is not None
        return self.process.stdout

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.process.pid)

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with status {code}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        self._log.flush()
        text = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %g s; killing it", self.name, timeout_s)
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        return self.process.returncode

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)


class Mesh:
    """One run's regions on this host: fresh ``redis-server``s, a WAN proxy in front of each
    region's Redis when there is a delay, region files, and the system under test (one process
    per region). A context manager: everything it started is stopped on exit."""

    def __init__(
        self,
        workdir: Path,
        regions: int,
        *,
        delay_ms: float = 0.0,
        batch_size: int | None = None,
        partitions: int = 1,
        processes: int = 1,
    ) -> None:
        if not 2 <= regions <= len(REGIONS):
            raise ValueError(f"between 2 and {len(REGIONS)} regions, not {regions}")
        if processes > 1 and partitions == 1:
            raise ValueError("several gateway processes per region share partitions: P above 1")
        self.workdir = workdir
        self.regions = REGIONS[:regions]
        self.delay_ms = delay_ms
        self.batch_size = batch_size
        self.partitions = partitions
        self.processes = processes
        self.servers: dict[str, RedisProcess] = {}
        self.clients: dict[str, redis.Redis] = {}
        self.proxies: dict[str, tuple[Child, int]] = {}
        self.children: list[Child] = []
        self.debug_populate = False
        self.names = Names(NAMESPACE, STREAM)

    def __enter__(self) -> Mesh:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_servers()
            if self.delay_ms > 0:
                self._start_proxies()
            self._write_configs()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with _ignoring_interrupts():
            self.close()

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        for client in self.clients.values():
            client.close()
        for server in self.servers.values():
            server.cleanup()
        self.servers.clear()

    @property
    def origin(self) -> str:
        return self.regions[0]

    def port(self, region: str) -> int:
        return self.servers[region].port

    def config_path(self, region: str, process: int = 0) -> Path:
        """Region file of one of the region's gateway processes (its own consumer name)."""
        return self.workdir / (f"{region}.toml" if process == 0 else f"{region}-{process}.toml")

    def _start_servers(self) -> None:
        self.debug_populate = redis_server_version() >= (7,)
        args = ("--enable-debug-command", "local") if self.debug_populate else ()
        for region in self.regions:
            server = RedisProcess(
                workdir=str(self.workdir / f"redis-{region}"), args=args, own_session=True
            )
            self.servers[region] = server
            server.start()
            self.clients[region] = redis.Redis(
                port=server.port,
                socket_timeout=60,
                socket_connect_timeout=5,
                retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            )
        if not self.debug_populate:
            self.debug_populate = self._debug_works()

    def _start_proxies(self) -> None:
        """One ``invalgw wan-proxy`` in front of each region's Redis: every other region's
        gateway (or forwarder) reaches it through the proxy, ``delay_ms`` each way."""
        for region in self.regions:
            port = free_port()
            argv = [sys.executable, "-m", "invalgw", "--log-level", "warning", "wan-proxy"]
            argv += ["--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{self.port(region)}"]
            argv += ["--delay-ms", f"{self.delay_ms:g}"]
            self.proxies[region] = (self.spawn(f"wan-proxy-{region}", argv), port)
        deadline = time.monotonic() + 30
        for child, port in self.proxies.values():
            while not port_in_use(port):
                child.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} not listening after 30 s")
                time.sleep(0.05)

    def _write_configs(self) -> None:
        ports = {region: server.port for region, server in self.servers.items()}
        peer_ports = {region: port for region, (_, port) in self.proxies.items()} or ports
        for region in self.regions:
            for process in range(self.processes):
                self.config_path(region, process).write_text(
                    region_toml(
                        region,
                        ports,
                        batch_size=self.batch_size,
                        peer_ports=peer_ports,
                        partitions=self.partitions,
                        consumer=f"bench-{process}",
                    )
                )

    def _debug_works(self) -> bool:
        try:
            self.clients[self.origin].execute_command("DEBUG", "POPULATE", 0)  # type: ignore[no-untyped-call]
        except redis.ResponseError:
            return False
        return True

    def cpu_times(self) -> dict[str, float]:
        """CPU seconds used so far by each redis-server, proxy and process of the system."""
        times = {}
        for region, server in self.servers.items():
            used = cpu_seconds(server.process.pid) if server.process else None
            if used is not None:
                times[f"redis-{region}"] = used
        for child in self.children:
            if child.measured:
                used = child.cpu_seconds()
                if used is not None:
                    times[child.name] = used
        return times

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()

    def keyspace_events(self, flags: str) -> None:
        for client in self.clients.values():
            client.config_set("notify-keyspace-events", flags)

    def spawn(
        self, name: str, argv: list[str], *, stdout_pipe: bool = False, measured: bool = True
    ) -> Child:
        with _deferring_interrupts():  # a child started is a child the rig stops
            child = Child(name, argv, self.workdir / f"{name}.log", stdout_pipe=stdout_pipe)
            self.children.append(child)
        child.measured = measured
        return child

    def stop(self, children: list[Child]) -> None:
        for child in children:
            child.stop()
            self.children.remove(child)

    def start_system(self, system: str, *, profile_dir: Path | None = None) -> list[Child]:
        """The system under test, one process per region; returns once each one reads."""
        if system == GATEWAY:
            return self.start_gateways(profile_dir=profile_dir)
        module = _BASELINE_MODULES[system]
        children = [
            self.spawn(
                f"{system}-{region}",
                [sys.executable, "-m", module, "--config", str(self.config_path(region))],
                stdout_pipe=True,
            )
            for region in self.regions
        ]
        for child in children:
            _read_ready(child)
        return children

    def start_gateways(self, *, profile_dir: Path | None = None) -> list[Child]:
        """``processes`` gateway processes per region; returns once every consumer group exists
        and (partitioned) the partitions' leases are spread evenly over the processes."""
        children = []
        for process in range(self.processes):
            for region in self.regions:
                name = f"gateway-{region}" + (f"-{process}" if process else "")
                argv = [sys.executable]
                if profile_dir is not None:
                    profile = profile_dir / f"{self.workdir.name}-{name}.pstats"
                    argv += ["-m", "cProfile", "-o", str(profile)]
                argv += ["-m", "invalgw", "--log-level", "warning", "run"]
                argv += ["--config", str(self.config_path(region, process))]
                children.append(self.spawn(name, argv))
        self._wait_ready(children, self._gateway_ready)
        return children

    def start_subscribers(self, prefix: str, per: int) -> dict[str, tuple[Child, Path]]:
        """One ``del``-event recorder per region; returns once each has subscribed."""
        started = {}
        for region in self.regions:
            out = self.workdir / f"gone-{prefix}-{region}.msgpack"
            argv = [sys.executable, "-m", "invalgw.dev.benchload", "subscribe"]
            argv += ["--port", str(self.port(region)), "--prefix", prefix, "--out", str(out)]
            argv += ["--keys", str(per)]
            child = self.spawn(f"subscriber-{region}", argv, stdout_pipe=True, measured=False)
            started[region] = (child, out)
        for child, _ in started.values():
            _read_ready(child)
        return started

    def _gateway_ready(self, region: str) -> bool:
        if self.partitions == 1:
            return self._groups_ready(region, self.names, None) and self._leases_spread(region)
        return all(
            self._groups_ready(region, self.names.partition(p, self.partitions), p)
            for p in range(self.partitions)
        ) and self._leases_spread(region)

    def _groups_ready(self, region: str, names: Names, partition: int | None) -> bool:
        client = self.clients[region]
        peers = [peer for peer in self.regions if peer != region]
        try:
            local = {g["name"].decode() for g in client.xinfo_groups(names.local_stream)}
            mirrors = [
                {g["name"].decode() for g in client.xinfo_groups(names.mirror(peer, partition))}
                for peer in peers
            ]
        except redis.ResponseError:
            return False
        wanted = {APPLY_GROUP, *(forward_group(peer) for peer in peers)}
        return wanted <= local and all(APPLY_GROUP in groups for groups in mirrors)

    def _leases_spread(self, region: str) -> bool:
        """With several processes: each holds its fair share of the partitions' leases."""
        if self.processes == 1:
            return True
        keys = [self.names.partition(p, self.partitions).lease for p in range(self.partitions)]
        holders: dict[bytes, int] = {}
        for value in self.clients[region].mget(keys):
            if not isinstance(value, bytes):
                return False
            holder = value.split()[0]
            holders[holder] = holders.get(holder, 0) + 1
        share = -(-self.partitions // self.processes)
        return len(holders) == self.processes and max(holders.values()) <= share

    def _wait_ready(
        self, children: list[Child], ready: Callable[[str], bool], timeout_s: float = 60.0
    ) -> None:
        deadline = time.monotonic() + timeout_s
        for region, child in zip(self.regions * self.processes, children, strict=True):
            while not ready(region):
                child.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} not ready after {timeout_s:g} s")
                time.sleep(0.05)


def _read_ready(child: Child, timeout_s: float = 30.0) -> None:
    line = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise RuntimeError(f"{child.name} not ready after {timeout_s:g} s")
            data = child.stdout.read1(1)  # type: ignore[attr-defined]
            if not data:
                child.check_alive()
                raise RuntimeError(f"{child.name} closed its output before it was ready")
            line += data
    if line.strip() != b"ready":
        raise RuntimeError(f"{child.name} said {line!r} instead of ready")


@contextlib.contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    """Let clean-up finish even if Ctrl-C is pressed again."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _deferring_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (and SIGTERM) until the block ends, then raise KeyboardInterrupt: one that
    came between starting a child process and recording it left the child running after the
    bench exited."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {signum: signal.signal(signum, note) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:
        raise KeyboardInterrupt


def interrupt_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into KeyboardInterrupt (so the rig cleans up); returns the undo."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)

    def undo() -> None:
        signal.signal(signal.SIGTERM, previous)

    return undo
