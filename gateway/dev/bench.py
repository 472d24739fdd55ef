"""``invalgw bench``: the gateway's throughput, CPU cost and latency, against a batched forwarder.

Every scenario runs each system in turn on fresh local ``redis-server``s (one per region, nothing
persisted), one OS process per region: the gateways (``invalgw run``) and, as the yardstick, the
batched forwarder a competent engineer would write by hand (:mod:`invalgw.dev.batched`: per
region, read 500 entries, one multi-key UNLINK on each peer, one UNLINK + XACK locally; no
mirror streams, dedup, gap detection or heartbeats). Rounds alternate which system goes first.

Throughput scenarios produce ``--n`` invalidations as fast as a pipelined producer can and time
them from the first XADD until every key is gone in every region; CPU is the user + system time
of every gateway or forwarder and every redis-server over that interval. Paced scenarios offer
a fixed rate and record, per region, when each invalidation's keys are deleted (keyspace
events), counting latency from the moment each XADD was *scheduled*, so a stalled producer
shows up as latency instead of hiding it.

Everything it starts is stopped on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib.metadata
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import redis

from invalgw.cliargs import bind
from invalgw.dev.benchload import (
    DEL_EVENTS,
    STOP,
    keys_of,
    left_invalidations,
    populate,
    produce_paced,
    produce_together,
    read_gone,
    wait_gone,
    xadd_commands,
)
from invalgw.dev.benchrig import (
    BATCHED,
    GATEWAY,
    NAIVE,
    STREAM,
    SYSTEMS,
    Mesh,
    interrupt_on_sigterm,
    redis_server_version,
)
from invalgw.dev.benchstats import (
    Machine,
    Report,
    Run,
    Scenario,
    check_targets,
    cpu_per_invalidation,
    cpu_used,
    gone_latencies,
    render,
    summarise,
    summarise_runs,
)

SCENARIO_NAMES = (
    "one-origin",
    "all-origins",
    "five-regions",
    "ten-keys",
    "wan-latency",
    "latency",
    "scaling",
)
DEFAULT_SCENARIOS = SCENARIO_NAMES[:-1]
"""Every scenario but ``scaling``, which measures the gateway alone."""
DESCRIPTION = """\
Measure the gateway against a hand-rolled batched forwarder on local regions (fresh
redis-servers on this host for every run): CPU time per invalidation of every process,
invalidations per second, and latency from XADD to keys gone in each peer region.

Scenarios (--scenario, comma-separated; all but scaling by default):
  one-origin     3 regions, one of them producing, 2 keys per invalidation
  all-origins    3 regions, all producing at once (--n split between them)
  five-regions   5 regions, one producing: what each added peer costs
  ten-keys       3 regions, one producing, 10 keys per invalidation
  wan-latency    3 regions behind a loopback WAN proxy (--delay-ms each way),
                 paced at --wan-rate: latency to each peer
  latency        3 regions, no delay, paced at --rate: latency to each peer
  scaling        2 regions, gateway only, partitioned streams: the rate with 1 and
                 with 2 gateway processes per region at P = 4 (their ratio), and
                 CPU per invalidation at one process for P = 1 and P = 8

Every scenario runs each system (--systems) on its own fresh servers, rounds alternating
which system goes first. A table goes to stdout; --json FILE writes every run and the
medians for machines. The defaults take about 3 minutes on a 2-core machine."""


@dataclass(frozen=True)
class BenchOptions:
    """``invalgw bench``'s options (the parser's dest names)."""

    scenario: str = ",".join(DEFAULT_SCENARIOS)
    systems: str = f"{GATEWAY},{BATCHED}"
    n: int = 100_000
    naive_n: int = 10_000
    rate: float = 5000
    wan_rate: float = 2000
    delay_ms: float = 25
    duration: float = 5
    warmup: float = 1
    rounds: int = 1
    batch_size: int | None = None
    json: str | None = None
    profile: Path | None = None
    keep: bool = False


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure CPU per invalidation, throughput and latency against a batched forwarder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenario",
        default=",".join(DEFAULT_SCENARIOS),
        metavar="NAMES",
        help="comma-separated scenarios to run (default: all but scaling)",
    )
    parser.add_argument(
        "--systems",
        default=f"{GATEWAY},{BATCHED}",
        metavar="NAMES",
        help="comma-separated systems to measure: gateway, batched, naive (a per-event "
        "forwarder, some 25 times slower; its throughput runs are cut to --naive-n) "
        "(default: gateway,batched)",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=100_000,
        metavar="N",
        help="invalidations per throughput run (default 100000)",
    )
    parser.add_argument(
        "--naive-n",
        type=int,
        default=10_000,
        metavar="N",
        help="at most this many per throughput run of the naive forwarder (default 10000)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=5000,
        metavar="R",
        help="latency scenario: invalidations offered per second (default 5000)",
    )
    parser.add_argument(
        "--wan-rate",
        type=float,
        default=2000,
        metavar="R",
        help="wan-latency scenario: invalidations offered per second (default 2000)",
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=25,
        metavar="MS",
        help="wan-latency scenario: one-way delay on every link between regions (default 25)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=5,
        metavar="S",
        help="paced scenarios: seconds measured, after the warm-up (default 5)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1,
        metavar="S",
        help="paced scenarios: seconds offered before measuring (default 1)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="K",
        help="run every scenario K times per system, interleaved; the table shows medians "
        "(default 1)",
    )
    parser.add_argument(
        "--batch-size", type=int, metavar="N", help="the gateways' batch_size (default: theirs)"
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="also write the report (every run, the medians, the targets) as JSON to FILE; "
        "with -, print the JSON instead of the table",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the gateways under cProfile, writing one .pstats file per run and region",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, logs) afterwards"
    )
    bind(parser, cmd_bench, BenchOptions)


def scenarios(args: BenchOptions) -> list[Scenario]:
    """The scenarios ``args`` pick, in the order they were named."""
    known = {
        "one-origin": Scenario(
            name="one-origin", description="3 regions, one producing", regions=3
        ),
        "all-origins": Scenario(
            name="all-origins", description="3 regions, all producing", regions=3, all_origins=True
        ),
        "five-regions": Scenario(
            name="five-regions", description="5 regions, one producing", regions=5
        ),
        "ten-keys": Scenario(
            name="ten-keys", description="3 regions, 10 keys per invalidation", regions=3, keys=10
        ),
        "wan-latency": Scenario(
            name="wan-latency",
            description=f"3 regions, {args.delay_ms:g} ms one way between them",
            regions=3,
            rate=args.wan_rate,
            delay_ms=args.delay_ms,
        ),
        "latency": Scenario(
            name="latency", description="3 regions, paced", regions=3, rate=args.rate
        ),
    }
    picked = [name.strip() for name in args.scenario.split(",") if name.strip()]
    unknown = [name for name in picked if name not in known and name != "scaling"]
    if unknown or not picked:
        raise ValueError(
            f"unknown scenario {', '.join(unknown) or '(none given)'}; "
            f"pick from {', '.join(SCENARIO_NAMES)}"
        )
    out: list[Scenario] = []
    for name in dict.fromkeys(picked):
        out += SCALING if name == "scaling" else [known[name]]
    return out


SCALING = [
    Scenario(
        name=f"scaling-p{partitions}x{processes}",
        description=f"2 regions, P = {partitions}, {processes} gateway process"
        + ("es" if processes > 1 else "")
        + " per region",
        regions=2,
        partitions=partitions,
        processes=processes,
    )
    for partitions, processes in ((4, 1), (4, 2), (1, 1), (8, 1))
]
"""The scaling scenario's runs (gateway only): P = 4 with 1 and 2 processes per region, and
P = 1 and P = 8 at one process."""


def _runs_system(scenario: Scenario, system: str) -> bool:
    """The scaling scenario measures the gateway alone (the baselines know neither partitions
    nor several processes)."""
    return system == GATEWAY or not scenario.name.startswith("scaling-")


def systems(args: BenchOptions) -> list[str]:
    picked = list(dict.fromkeys(name.strip() for name in args.systems.split(",") if name.strip()))
    unknown = [name for name in picked if name not in SYSTEMS]
    if unknown or not picked:
        raise ValueError(
            f"unknown system {', '.join(unknown) or '(none given)'}; pick from {', '.join(SYSTEMS)}"
        )
    return picked


def cmd_bench(args: BenchOptions) -> int:
    for name in ("n", "naive_n", "rate", "wan_rate", "duration", "rounds"):
        if getattr(args, name) <= 0:
            print(f"invalgw bench: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if args.warmup < 0 or args.delay_ms < 0:
        print("invalgw bench: --warmup and --delay-ms must not be negative", file=sys.stderr)
        return 2
    try:
        picked, measured = scenarios(args), systems(args)
    except ValueError as exc:
        print(f"invalgw bench: {exc}", file=sys.stderr)
        return 2
    command = "invalgw " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "invalgw bench"
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: where is it stuck?
    undo = interrupt_on_sigterm()
    try:
        report = run(args, command, picked, measured)
    except KeyboardInterrupt:
        print("invalgw bench: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, redis.RedisError, OSError) as exc:
        print(f"invalgw bench: a run failed, nothing is left running: {exc}", file=sys.stderr)
        return 1
    finally:
        undo()
    if args.json is not None:
        encoded = msgspec.json.format(msgspec.json.encode(report), indent=2).decode() + "\n"
        if args.json == "-":
            sys.stdout.write(encoded)
            return 0
        Path(args.json).write_text(encoded)
    sys.stdout.write(render(report))
    return 0


def run(args: BenchOptions, command: str, picked: list[Scenario], measured: list[str]) -> Report:
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        args = replace(args, profile=args.profile.resolve())
    workdir = Path(tempfile.mkdtemp(prefix="invalgw-bench-"))
    todo = [(s, system) for s in picked for system in measured if _runs_system(s, system)]
    progress = Progress(len(todo) * args.rounds)
    load_start = _load_average()
    runs: list[Run] = []
    try:
        for round_ in range(args.rounds):
            order = measured if round_ % 2 == 0 else measured[::-1]
            for scenario in picked:
                for system in order:
                    if not _runs_system(scenario, system):
                        continue
                    progress.next(f"{scenario.name}, {system}")
                    runs.append(run_once(workdir, scenario, system, round_, args, progress))
    finally:
        progress.done()
        if args.keep:
            print(f"invalgw bench: work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summaries = summarise_runs(runs)
    return Report(
        command=command,
        machine=describe_machine(),
        scenarios=picked,
        runs=runs,
        summaries=summaries,
        targets=check_targets(summaries, picked),
        load_average=None if load_start is None else (load_start, _load_average() or 0.0),
    )


def run_once(
    workdir: Path,
    scenario: Scenario,
    system: str,
    round_: int,
    args: BenchOptions,
    progress: Progress,
) -> Run:
    """One system through one scenario, on servers of its own."""
    where = workdir / f"{scenario.name}-{system}-{round_}"
    with Mesh(
        where,
        scenario.regions,
        delay_ms=scenario.delay_ms,
        batch_size=args.batch_size,
        partitions=scenario.partitions,
        processes=scenario.processes,
    ) as mesh:
        progress.step("starting")
        mesh.start_system(system, profile_dir=args.profile if system == GATEWAY else None)
        if scenario.rate is None:
            n = min(args.n, args.naive_n) if system == NAIVE else args.n
            result = measure_throughput(mesh, scenario, system, n, progress)
        else:
            result = measure_latency(mesh, scenario, system, args, progress)
        mesh.check_alive()
    return msgspec.structs.replace(result, round=round_)


def measure_throughput(
    mesh: Mesh, scenario: Scenario, system: str, n: int, progress: Progress
) -> Run:
    per = scenario.keys
    origins = list(mesh.regions if scenario.all_origins else mesh.regions[:1])
    shares = split(n, len(origins))
    prefixes = {origin: f"tp-{origin}" for origin in origins}
    progress.step(f"creating {n * per:,} keys per region")
    for region in mesh.regions:
        for prefix, share in zip(prefixes.values(), shares, strict=True):
            populate(mesh.port(region), prefix, share * per, use_debug=mesh.debug_populate)
    loads = {
        mesh.port(origin): xadd_commands(STREAM, prefix, share, per, partitions=scenario.partitions)
        for (origin, prefix), share in zip(prefixes.items(), shares, strict=True)
    }
    total = sum(shares)
    progress.step(f"{total:,} invalidations")
    before = mesh.cpu_times()
    start, _produced = produce_together(loads)
    last = [
        key
        for prefix, share in zip(prefixes.values(), shares, strict=True)
        for key in keys_of(prefix, share - 1, per)
    ]
    gone = _wait_gone(mesh, last, timeout_s=max(60.0, total / 1000))
    after = mesh.cpu_times()
    missing = _left(mesh, list(prefixes.values()), per)
    if any(missing.values()):  # the last went before some earlier ones: the clock runs on
        deadline = time.monotonic() + 30
        while any(missing.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
            missing = _left(mesh, list(prefixes.values()), per)
        gone = dict.fromkeys(gone, time.monotonic())
        after = mesh.cpu_times()
    seconds = max(gone.values()) - start
    return _result(
        mesh, scenario, system, origins, total, seconds, cpu_used(before, after), missing
    )


def _left(mesh: Mesh, prefixes: list[str], per: int) -> dict[str, int]:
    """Per region, the invalidations with a key left (a SCAN: slow, so only once the last
    invalidation's keys are gone)."""
    return {
        region: sum(left_invalidations(client, prefix, per) for prefix in prefixes)
        for region, client in mesh.clients.items()
    }


def split(n: int, parts: int) -> list[int]:
    """``n`` in ``parts`` shares that differ by at most one (each at least one)."""
    return [max(1, n // parts + (1 if index < n % parts else 0)) for index in range(parts)]


def measure_latency(
    mesh: Mesh, scenario: Scenario, system: str, args: BenchOptions, progress: Progress
) -> Run:
    rate, per, prefix = scenario.rate or args.rate, scenario.keys, "lat"
    warmup = round(args.warmup * rate)
    total = warmup + round(args.duration * rate)
    for region in mesh.regions:
        populate(mesh.port(region), prefix, total * per, use_debug=mesh.debug_populate)
    commands = xadd_commands(STREAM, prefix, total, per)
    mesh.keyspace_events("Eg")
    subscribers = mesh.start_subscribers(prefix, per)
    progress.step(f"{total:,} invalidations at {rate:,.0f}/s")
    before = mesh.cpu_times()
    scheduled, elapsed, late = produce_paced(mesh.port(mesh.origin), commands, rate)
    after = mesh.cpu_times()
    with contextlib.suppress(TimeoutError):  # what never went is counted as missing below
        _wait_gone(mesh, keys_of(prefix, total - 1, per), timeout_s=30)
    for client in mesh.clients.values():
        client.publish(DEL_EVENTS, STOP)
    gone = {}
    for region, (child, out) in subscribers.items():
        child.wait(30)
        gone[region] = read_gone(out)
    mesh.stop([child for child, _ in subscribers.values()])
    latency, missing = {}, {}
    for region in mesh.regions:
        latencies, missing[region] = gone_latencies(scheduled, gone[region], first=warmup)
        if latencies:
            latency[region] = summarise(latencies)
    result = _result(
        mesh, scenario, system, [mesh.origin], total, elapsed, cpu_used(before, after), missing
    )
    return msgspec.structs.replace(
        result, latency=latency, offered_rate=rate, producer_late_ms=late * 1000
    )


def _result(
    mesh: Mesh,
    scenario: Scenario,
    system: str,
    origins: list[str],
    invalidations: int,
    seconds: float,
    cpu: dict[str, float],
    missing: dict[str, int],
) -> Run:
    origin = cpu.get(f"{system}-{origins[0]}")
    return Run(
        scenario=scenario.name,
        system=system,
        round=0,
        regions=list(mesh.regions),
        origins=origins,
        keys_per_invalidation=scenario.keys,
        invalidations=invalidations,
        seconds=seconds,
        rate=invalidations / seconds if seconds > 0 else 0.0,
        delay_ms=scenario.delay_ms,
        cpu_seconds=cpu,
        cpu_us=cpu_per_invalidation(cpu, invalidations),
        origin_us=None if origin is None else origin / invalidations * 1e6,
        core_share={name: used / seconds for name, used in cpu.items()} if seconds > 0 else {},
        missing=missing,
    )


def _wait_gone(mesh: Mesh, keys: Sequence[str], *, timeout_s: float) -> dict[str, float]:
    try:
        return wait_gone(mesh.clients, keys, timeout_s=timeout_s, poll_s=0.005)
    except (TimeoutError, redis.RedisError):
        mesh.check_alive()  # a process that died says so; otherwise the timeout stands
        raise


class Progress:
    """One line on stderr, rewritten as the runs go, when stderr is a terminal; else silent."""

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.current = 0
        self.label = ""
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()

    def next(self, label: str) -> None:
        self.current += 1
        self.label = label
        self.step("")

    def step(self, what: str) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.started
            text = f"invalgw bench [{self.current}/{self.runs}, {elapsed:.0f} s] {self.label}"
            sys.stderr.write(f"\r\033[K{text}{': ' + what if what else ''}")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def describe_machine() -> Machine:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "?"
    return Machine(
        nproc=os.cpu_count() or 0,
        cpu_model=model,
        python=platform.python_version(),
        redis_server=".".join(map(str, redis_server_version())),
        redis_py=version("redis"),
        hiredis=version("hiredis"),
        msgspec=version("msgspec"),
        platform=platform.platform(),
    )
