"""``invalgw demo``: every region of ``regions/`` on this machine, with traffic and a lag table.

In order: read the region files; start one ``redis-server`` per region on the port its file names;
start one gateway per region as a process of its own (``python -m invalgw run --config …``),
logging into the demo directory (``.demo/``); play every region's services (cache keys in every
region, then invalidate them in their home region with the producer helper); redraw the lag
table every second. Ctrl-C, SIGTERM or ``--duration`` stop it all: the traffic, then the gateways
(SIGTERM, so they drain), then the Redis servers. Nothing keeps running after it exits.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import redis

from invalgw.cliargs import bind
from invalgw.connections import REDIS_ERRORS, AsyncRedis, close, connect
from invalgw.dev.errors import DemoFailed
from invalgw.dev.localmesh import LocalRegion, check_ports, load_mesh
from invalgw.dev.localredis import RedisProcess, find_redis_server
from invalgw.errors import ConfigError, GatewayError
from invalgw.lag import status_decoder
from invalgw.names import APPLY_GROUP, forward_group
from invalgw.ops.lagtable import STYLES, Column, LagCollector, Snapshot, render_json, render_text
from invalgw.ops.terminal import Screen, keys_pressed
from invalgw.producer import Invalidator

DEFAULT_RATE = 300
DEFAULT_WORKDIR = ".demo"
REFRESH_S = 1.0
QUIET_REFRESH_S = 10.0
"""When the output is not a terminal (a log, CI), a table this often, not every second."""
TRAFFIC_TICK_S = 0.05
USERS = 10_000
"""Each region's traffic cycles through this many users, two cached keys per user."""
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
"""How long past its own drain timeout a gateway gets before it is killed."""
MAX_EVENTS = 2


@dataclass(frozen=True)
class DemoOptions:
    regions: str | None = None
    rate: float = DEFAULT_RATE
    duration: float | None = None
    port_base: int | None = None
    workdir: str = DEFAULT_WORKDIR
    kill_region: str | None = None
    after: float = 10.0
    down_for: float = 10.0
    json: str | None = None
    no_color: bool = False


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="run every region of regions/ on this machine, with traffic and a live lag table",
        description=(
            "Start one redis-server and one gateway per region file, generate invalidations in "
            "every region and show, every second, how they arrive everywhere. Ctrl-C stops "
            "everything it started."
        ),
    )
    parser.add_argument(
        "--regions",
        metavar="DIR",
        help="region files (default: ./regions if there is one, else the sample regions that "
        "ship with invalgw)",
    )
    parser.add_argument(
        "--rate",
        type=_positive,
        default=DEFAULT_RATE,
        metavar="N",
        help=f"invalidations per second in each region (default: {DEFAULT_RATE})",
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        metavar="S",
        help="stop after S seconds (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--port-base",
        type=_port,
        metavar="PORT",
        help="move the ports: Redis on PORT, PORT+1, …, the gateways' metrics right after "
        "(default: the ports the region files name)",
    )
    parser.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        metavar="DIR",
        help=f"where logs and Redis files go (default: ./{DEFAULT_WORKDIR})",
    )
    parser.add_argument(
        "--kill-region",
        metavar="NAME",
        help="stop this region's gateway after --after seconds and start it again --down-for "
        "seconds later: its backlogs grow, then it catches up",
    )
    parser.add_argument(
        "--after",
        type=_positive,
        default=10.0,
        metavar="S",
        help="with --kill-region: seconds before its gateway stops (default: 10)",
    )
    parser.add_argument(
        "--down-for",
        type=_positive,
        default=10.0,
        metavar="S",
        help="with --kill-region: seconds its gateway stays stopped (default: 10)",
    )
    parser.add_argument(
        "--json", metavar="FILE", help="write the last table as JSON to FILE when stopping"
    )
    parser.add_argument("--no-color", action="store_true", help="plain text, no ANSI colours")
    bind(parser, cmd_demo, DemoOptions)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1024 <= value <= 65000:
        raise argparse.ArgumentTypeError(f"must be between 1024 and 65000, got {text}")
    return value


def regions_dir(given: str | None) -> Path:
    """The region files to run: ``given``, else ./regions, else the samples in the package."""
    if given is not None:
        return Path(given)
    if Path("regions").is_dir():
        return Path("regions")
    samples = importlib.resources.files("invalgw.regions").iterdir()
    return Path(str(next(sample for sample in samples if sample.name.endswith(".toml")))).parent


def cmd_demo(options: DemoOptions) -> int:
    workdir = Path(options.workdir)
    regions = regions_dir(options.regions)
    options = replace(options, regions=str(regions))
    mesh = load_mesh(regions, port_base=options.port_base, workdir=workdir)
    names = [region.name for region in mesh]
    if options.kill_region is not None and options.kill_region not in names:
        raise ConfigError(
            "--kill-region", [f"no region {options.kill_region!r} in {regions} ({names})"]
        )
    find_redis_server()  # before anything starts: the install hint, if Redis is missing
    check_ports(mesh, moved=options.port_base is not None)
    for previous in ("logs", "redis"):
        shutil.rmtree(workdir / previous, ignore_errors=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    screen = Screen(sys.stdout, color=not options.no_color and "NO_COLOR" not in os.environ)
    demo = Demo(options, [Member(region) for region in mesh], workdir, screen)
    code: int = anyio.run(demo.run)
    return code


@dataclass
class Member:
    """One region of the demo and the processes the demo runs for it."""

    region: LocalRegion
    redis: RedisProcess | None = None
    gateway: anyio.abc.Process | None = None
    gateway_state: str = "not started"
    busy: bool = False
    """A stop or start of the gateway is under way."""
    exit_reported: bool = False
    started_ms: float = 0.0
    """The region's Redis clock when its gateway was last started."""

    @property
    def name(self) -> str:
        return self.region.name

    def gateway_running(self) -> bool:
        return self.gateway is not None and self.gateway.returncode is None

    def gateway_crashed(self) -> bool:
        """The gateway exited without being asked to."""
        return self.gateway_label().startswith("exited")

    def gateway_label(self) -> str:
        if self.gateway is None or self.gateway.returncode is None:
            return self.gateway_state
        if self.gateway_state in ("stopped", "killed"):
            return self.gateway_state
        return f"exited {self.gateway.returncode}"


@dataclass
class Demo:
    options: DemoOptions
    members: list[Member]
    workdir: Path
    screen: Screen
    clients: dict[str, AsyncRedis] = field(default_factory=dict)
    events: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    last: Snapshot | None = None
    last_frame: list[str] = field(default_factory=list)
    printed_at: float | None = None
    """Not on a terminal: when a table was last printed (every QUIET_REFRESH_S, and at stop)."""
    stopping: bool = False
    started_at: float = 0.0
    _run_scope: anyio.CancelScope | None = None
    _tasks: anyio.abc.TaskGroup | None = None

    async def run(self) -> int:
        """Start, show, and always stop everything; 0 unless something failed."""
        failure: GatewayError | None = None
        crashed: list[str] = []
        self._run_scope = anyio.CancelScope()
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_signals, signals)
                try:
                    with self._run_scope:
                        await self._start()
                        await self._show()
                except GatewayError as exc:
                    failure = exc
                finally:
                    with anyio.CancelScope(shield=True):
                        crashed = await self._stop()
                    tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if crashed:
            raise DemoFailed("; ".join(crashed))
        return 0

    def request_stop(self) -> None:
        self.stopping = True
        if self._run_scope is not None:
            self._run_scope.cancel()

    async def _watch_signals(self, signals: AsyncIterator[signal.Signals]) -> None:
        async for _ in signals:
            if not self.stopping:
                self.request_stop()
                continue
            for member in self.members:  # a second Ctrl-C: no more waiting for drains
                if member.gateway is not None and member.gateway_running():
                    member.gateway.kill()

    # Start ---------------------------------------------------------------------------------

    async def _start(self) -> None:
        say = self.screen.say
        say(f"invalgw demo: {len(self.members)} regions from {self.options.regions}/")
        for member in self.members:
            await self._start_redis(member)
            self.clients[member.name] = connect(
                member.region.config.redis, name=f"invalgw:{member.name}:demo"
            )
        for member in self.members:
            await self._start_gateway(member)
        self._progress(f"waiting for {len(self.members)} gateways to create their groups…")
        failures: list[str] = []
        async with anyio.create_task_group() as tg:
            for member in self.members:
                tg.start_soon(self._wait_ready, member, failures)
        if failures:
            raise DemoFailed("\n".join(failures))
        width = max(len(member.name) for member in self.members)
        for member in self.members:
            assert member.gateway is not None
            metrics = member.region.config.metrics
            line = (
                f"  {member.name:<{width}}  redis-server 127.0.0.1:{member.region.port}"
                f"  gateway pid {member.gateway.pid}"
            )
            if metrics.port:
                line += f"  metrics http://{metrics.host}:{metrics.port}/metrics"
            say(line)
        say(f"Logs: {self.workdir}/logs/<region>.log (gateways), {self.workdir}/redis/ (Redis)")
        say(
            f"Traffic: {self.options.rate:,.0f} invalidations/s in each region, of 2 keys each, "
            "cached in every region first"
        )
        say()

    def _progress(self, text: str) -> None:
        """A step of the start-up, shown on a terminal only (a log or CI gets the summary)."""
        if self.screen.live:
            self.screen.say(self.screen.style(text, STYLES["dim"]))

    async def _start_redis(self, member: Member) -> None:
        self._progress(f"starting redis-server for {member.name} on port {member.region.port}…")
        workdir = self.workdir / "redis" / member.name
        # its own session: a Ctrl-C reaches only the demo, which stops it after the gateways
        member.redis = RedisProcess(member.region.port, workdir=workdir, own_session=True)
        try:
            await anyio.to_thread.run_sync(member.redis.start)
        except (RuntimeError, *REDIS_ERRORS) as exc:
            raise DemoFailed(
                f"{member.name}: redis-server on port {member.region.port} did not start "
                f"({exc}); see {member.redis.logfile}"
            ) from None

    def _log_path(self, member: Member) -> Path:
        return self.workdir / "logs" / f"{member.name}.log"

    async def _start_gateway(self, member: Member) -> None:
        config = str(member.region.config_path)
        command = [sys.executable, "-m", "invalgw", "run", "--config", config]
        seconds, micros = await self.clients[member.name].time()
        member.started_ms = seconds * 1000 + micros / 1000
        # shielded: a Ctrl-C must not leave a process running that the demo does not know of
        with self._log_path(member).open("ab") as log, anyio.CancelScope(shield=True):
            member.gateway = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        member.gateway_state = "starting"
        member.exit_reported = False

    async def _wait_ready(self, member: Member, failures: list[str]) -> None:
        """Wait until the gateway has its consumer groups and reports, or say why not."""
        assert member.gateway is not None
        names = member.region.names
        peers = [peer.name for peer in member.region.config.peers]
        wanted = {names.local_stream: {APPLY_GROUP, *(forward_group(peer) for peer in peers)}}
        wanted.update({names.mirror(peer): {APPLY_GROUP} for peer in peers})
        with anyio.move_on_after(READY_TIMEOUT_S):
            while member.gateway.returncode is None:
                client = self.clients[member.name]
                if await _has_groups(client, wanted) and await _reported_since(
                    client, names.status, member.name, member.started_ms
                ):
                    member.gateway_state = "running"
                    return
                await anyio.sleep(0.1)
        log = self._log_path(member)
        if member.gateway.returncode is None:
            failures.append(
                f"the gateway of {member.name} was not ready after {READY_TIMEOUT_S:.0f} s; "
                f"see {log}"
            )
            return
        last_lines = await anyio.Path(log).read_text(errors="replace")
        failures.append(
            f"the gateway of {member.name} exited with status {member.gateway.returncode} "
            f"while starting; the end of {log}:\n"
            + "\n".join(f"    {line}" for line in last_lines.splitlines()[-4:])
        )

    # Run -----------------------------------------------------------------------------------

    async def _show(self) -> None:
        self.started_at = time.monotonic()
        collector = LagCollector.from_configs([member.region.config for member in self.members])
        try:
            async with anyio.create_task_group() as tg:
                self._tasks = tg
                for member in self.members:
                    tg.start_soon(self._traffic, member)
                tg.start_soon(self._read_keys)
                if self.options.kill_region:
                    outage = next(m for m in self.members if m.name == self.options.kill_region)
                    tg.start_soon(self._outage, outage)
                await self._refresh(collector)
                tg.cancel_scope.cancel()
        finally:
            self._tasks = None
            with anyio.CancelScope(shield=True):
                await collector.aclose()

    async def _refresh(self, collector: LagCollector) -> None:
        """Redraw the table every second; return when ``--duration`` is over."""
        duration = self.options.duration
        frame = 0
        while True:
            self.last = await collector.collect()
            stale = await self._stale_keys()
            self._note_exits()
            self.last_frame = self._frame(self.last, stale)
            self._draw()
            frame += 1
            elapsed = time.monotonic() - self.started_at
            if duration is not None and elapsed >= duration:
                return
            next_frame = frame * REFRESH_S
            if duration is not None:
                next_frame = min(next_frame, duration)
            await anyio.sleep(max(0.0, next_frame - elapsed))

    def _draw(self) -> None:
        """Redraw on a terminal; otherwise print a table now and then (a log stays short)."""
        now = time.monotonic()
        if self.screen.live:
            self.screen.draw(self.last_frame)
        elif self.printed_at is None or now - self.printed_at >= QUIET_REFRESH_S:
            self.screen.draw(self.last_frame)
            self.printed_at = now

    def _frame(self, snapshot: Snapshot, stale: dict[str, str]) -> list[str]:
        elapsed = int(time.monotonic() - self.started_at)
        screen = self.screen
        title = (
            f"invalgw demo · {len(self.members)} regions · "
            f"{self.options.rate:,.0f} invalidations/s per region · "
            f"{elapsed // 60}:{elapsed % 60:02d}"
        )
        interactive = screen.live and sys.stdin.isatty()
        hint = "Ctrl-C stops everything"
        if interactive:
            hint += f" · keys 1-{len(self.members)} stop/start a region's gateway · q quits"
        gateways = {
            member.name: f"[{i}] {member.gateway_label()}"
            if interactive
            else member.gateway_label()
            for i, member in enumerate(self.members, start=1)
        }
        lines = [screen.style(title, STYLES["header"]), screen.style(hint, STYLES["dim"]), ""]
        lines += render_text(
            snapshot,
            color=screen.color,
            width=screen.width,
            region_columns=[
                (Column("GATEWAY", "<", width=12), gateways),
                (Column("STALE KEYS"), stale),
            ],
        )
        if self.events:
            lines += ["", *self.events]
        return lines

    def _event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')}  {text}")

    def _note_exits(self) -> None:
        for member in self.members:
            if member.gateway_crashed() and not member.exit_reported:
                member.exit_reported = True
                self._event(
                    f"the gateway of {member.name} {member.gateway_label()}: "
                    f"see {self._log_path(member)}"
                )

    async def _stale_keys(self) -> dict[str, str]:
        """Per region, cached keys whose invalidation has not been applied there yet.

        The traffic caches keys just before invalidating them, so every key in a region's Redis
        that is not one of the gateway's own is waiting for its invalidation.
        """
        counts: dict[str, str] = {}
        for member in self.members:
            try:
                async with self.clients[member.name].pipeline(transaction=False) as pipe:
                    pipe.dbsize()
                    pipe.exists(*member.region.gateway_keys())
                    total, gateway_keys = await pipe.execute()
            except REDIS_ERRORS:
                counts[member.name] = "-"
                continue
            counts[member.name] = f"{total - gateway_keys:,}"
        return counts

    async def _traffic(self, member: Member) -> None:
        """Play the region's services: cache keys everywhere, then invalidate them here."""
        rate = float(self.options.rate)
        per_tick = max(1, int(rate * TRAFFIC_TICK_S))
        invalidator = Invalidator(
            self.clients[member.name],
            stream=member.region.config.streams.local,
            source="invalgw-demo",
        )
        started = time.monotonic()
        sent = 0
        user = 0
        while True:
            await anyio.sleep(TRAFFIC_TICK_S)
            due = int((time.monotonic() - started) * rate) - sent
            if due > rate:  # more than a second behind (a stall): skip it rather than burst
                sent += due - per_tick
                due = per_tick
            if due <= 0:
                continue
            batch = []
            for _ in range(due):
                prefix = f"demo:{member.name}:user:{user}"
                batch.append((f"{prefix}:profile", f"{prefix}:permissions"))
                user = (user + 1) % USERS
            cached = {key: b"cached" for keys in batch for key in keys}
            try:
                for client in self.clients.values():
                    await client.mset(cached)
                for keys in batch:
                    await invalidator.invalidate(*keys)
            except REDIS_ERRORS as exc:
                self._event(f"traffic in {member.name}: {exc}")
                await anyio.sleep(REFRESH_S)
            sent += due

    async def _read_keys(self) -> None:
        if not self.screen.live:
            return
        with keys_pressed() as fd:
            if fd is None:
                return
            while True:
                await anyio.wait_readable(fd)
                for key in os.read(fd, 64).decode(errors="ignore"):
                    if key in "qQ":
                        self.request_stop()
                    elif key.isdigit() and 1 <= int(key) <= len(self.members):
                        self._toggle_soon(self.members[int(key) - 1])

    async def _outage(self, member: Member) -> None:
        await anyio.sleep(self.options.after)
        await self._toggle(member)
        await anyio.sleep(self.options.down_for)
        await self._toggle(member)

    def _toggle_soon(self, member: Member) -> None:
        if self._tasks is not None and not member.busy:
            self._tasks.start_soon(self._toggle, member)

    async def _toggle(self, member: Member) -> None:
        """Stop the region's gateway if it runs, else start it."""
        if member.busy:
            return
        member.busy = True
        try:
            if member.gateway_running():
                self._event(f"stopping the gateway of {member.name}: its backlogs will grow")
                await self._stop_gateway(member)
                self._event(f"the gateway of {member.name} {member.gateway_label()}")
            else:
                self._event(f"starting the gateway of {member.name} again")
                await self._start_gateway(member)
                failures: list[str] = []
                await self._wait_ready(member, failures)
                if failures:
                    self._event(failures[0].splitlines()[0])
                else:
                    self._event(f"the gateway of {member.name} runs again: watch it catch up")
        finally:
            member.busy = False

    # Stop ----------------------------------------------------------------------------------

    async def _stop(self) -> list[str]:
        """Stop the gateways (they drain), then the Redis servers; say which gateways failed."""
        if not self.screen.live and self.last_frame and self.printed_at is not None:
            self.screen.draw(self.last_frame)  # the final state, for the record
        self.screen.release()
        if self.last is not None:
            self.screen.say()
        crashed = [member for member in self.members if member.gateway_crashed()]
        running = [member for member in self.members if member.gateway_running()]
        if running:
            self.screen.say(f"Stopping {len(running)} gateways (SIGTERM: they drain)…")
        async with anyio.create_task_group() as tg:
            for member in running:
                tg.start_soon(self._stop_gateway, member)
        crashed += [member for member in running if member.gateway_crashed()]
        for client in self.clients.values():
            await close(client)
        servers = [
            member.redis
            for member in self.members
            if member.redis is not None and member.redis.process is not None
        ]
        if servers:
            self.screen.say(f"Stopping {len(servers)} redis-servers…")
        async with anyio.create_task_group() as tg:
            for server in servers:
                tg.start_soon(anyio.to_thread.run_sync, server.stop)
        if self.options.json and self.last is not None:
            await anyio.Path(self.options.json).write_bytes(render_json(self.last))
        self.screen.say(f"Stopped. Logs are in {self.workdir}/")
        return [
            f"the gateway of {member.name} {member.gateway_label()}; see {self._log_path(member)}"
            for member in crashed
        ]

    async def _stop_gateway(self, member: Member) -> None:
        process = member.gateway
        if process is None or process.returncode is not None:
            return
        if member.gateway_state != "stopping":  # a second SIGTERM would skip the drain
            member.gateway_state = "stopping"
            process.terminate()
        drain_s = member.region.config.gateway.drain_timeout_ms / 1000
        with anyio.move_on_after(drain_s + STOP_GRACE_S):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.returncode == 0:
            member.gateway_state = "stopped"
        elif process.returncode == -signal.SIGKILL:
            member.gateway_state = "killed"


async def _reported_since(client: AsyncRedis, key: str, region: str, since_ms: float) -> bool:
    """Whether the region's gateway has written its own status since ``since_ms``."""
    raw = await client.hget(key, region)
    try:
        return raw is not None and status_decoder.decode(raw).updated_ms >= since_ms
    except ValueError:  # unreadable: the gateway rewrites it within a second
        return False


async def _has_groups(client: AsyncRedis, wanted: dict[str, set[str]]) -> bool:
    for stream, groups in wanted.items():
        try:
            found = {group["name"].decode() for group in await client.xinfo_groups(stream)}
        except redis.ResponseError:
            return False  # the stream does not exist yet
        if not groups <= found:
            return False
    return True
