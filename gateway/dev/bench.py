"""``invalgw bench``: throughput and latency of the gateway against a naive forwarder, one run.

It starts three regions on this host (three ``redis-server`` processes on free ports) and runs
each system under test as three OS processes, one per region: first the gateways, then the naive
per-event forwarder (:mod:`invalgw.dev.naive`, the baseline). For each it measures, with every
invalidation removing two keys and produced into the origin region (us-east):

- **latency**: a paced producer offers ``--rate`` invalidations per second for ``--duration``
  seconds; a subscriber per region records when each key's ``del`` keyspace event arrives.
  Latency = that time - the producer's XADD time, both on this host's monotonic clock.
- **throughput**: ``--invalidations`` N are XADDed by a pipelined producer as fast as it can;
  the clock runs from the first XADD until the keys are gone in every region.

Everything it starts is stopped on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec

from invalgw.cliargs import bind
from invalgw.dev.benchload import (
    DEL_EVENTS,
    STOP,
    count_left,
    keys_of,
    populate,
    produce_all,
    produce_paced,
    read_gone,
    wait_gone,
    xadd_commands,
)
from invalgw.dev.benchrig import (
    REGIONS,
    STREAM,
    Child,
    Rig,
    interrupt_on_sigterm,
    redis_server_version,
)
from invalgw.dev.benchstats import (
    GATEWAY,
    NAIVE,
    Latency,
    Machine,
    Report,
    SystemResult,
    Throughput,
    check_targets,
    compare,
    gone_latencies,
    render,
    summarise,
)

log = logging.getLogger(__name__)

NAIVE_INVALIDATIONS = 20_000


@dataclass(frozen=True)
class BenchOptions:
    invalidations: int = 200_000
    naive_invalidations: int = NAIVE_INVALIDATIONS
    rate: float = 5000
    duration: float = 10
    warmup: float = 1
    skip_naive: bool = False
    skip_latency: bool = False
    skip_throughput: bool = False
    batch_size: int | None = None
    json: str | None = None
    profile: Path | None = None
    keep: bool = False


DESCRIPTION = """\
Measure the gateway on this machine, against a naive forwarder (one command per event per
region) as the baseline. It starts three regions here (three redis-server processes on free
ports), runs each system as three processes, one per region, and measures two things, with
every invalidation removing two keys and written in the region us-east:

  latency     a producer offers --rate invalidations per second for --duration seconds;
              the time from each XADD until its keys are gone in each peer region.
  throughput  --invalidations are written as fast as possible; how many per second are
              gone in all three regions.

Progress goes to stderr (one line per phase); the report to stdout. Everything it starts is
stopped when it ends, on Ctrl-C and on SIGTERM.
"""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure throughput and latency on a local 3-region set-up, against a naive forwarder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--invalidations",
        type=int,
        default=200_000,
        metavar="N",
        help="throughput run: invalidations to produce as fast as possible (default 200000)",
    )
    parser.add_argument(
        "--naive-invalidations",
        type=int,
        default=NAIVE_INVALIDATIONS,
        metavar="N",
        help="throughput run of the naive baseline: at most this many, as it is some 20 times "
        f"slower (default {NAIVE_INVALIDATIONS})",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=5000,
        metavar="R",
        help="latency run: invalidations offered per second (default 5000)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10,
        metavar="S",
        help="latency run: seconds measured at --rate, after the warm-up (default 10)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1,
        metavar="S",
        help="latency run: seconds at --rate before measuring (default 1)",
    )
    parser.add_argument("--skip-naive", action="store_true", help="measure the gateway only")
    parser.add_argument("--skip-latency", action="store_true", help="throughput only")
    parser.add_argument("--skip-throughput", action="store_true", help="latency only")
    parser.add_argument(
        "--batch-size", type=int, metavar="N", help="gateway.batch_size (default: the config's)"
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the report as JSON to FILE; with no FILE, print JSON instead of the table",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the gateways under cProfile, writing DIR/gateway-<region>.pstats",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, logs) afterwards"
    )
    bind(parser, cmd_bench, BenchOptions)


def cmd_bench(args: BenchOptions) -> int:
    if args.warmup < 0:
        print("invalgw bench: --warmup must not be negative", file=sys.stderr)
        return 2
    for name in ("invalidations", "naive_invalidations", "rate", "duration"):
        if getattr(args, name) <= 0:
            print(f"invalgw bench: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    command = "invalgw " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "invalgw bench"
    undo = interrupt_on_sigterm()
    try:
        report = run(args, command)
    except KeyboardInterrupt:
        print("invalgw bench: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
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


def run(args: BenchOptions, command: str) -> Report:
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        args = replace(args, profile=args.profile.resolve())
    results: dict[str, SystemResult] = {}
    load_start = _load_average()
    with Rig(keep=args.keep, batch_size=args.batch_size) as rig:
        _say(f"work directory {rig.workdir}")
        rig.start_servers()
        systems = [GATEWAY] if args.skip_naive else [GATEWAY, NAIVE]
        for system in systems:
            results[system] = measure(rig, system, args)
    origin, peers = REGIONS[0], list(REGIONS[1:])
    gateway, naive = results[GATEWAY], results.get(NAIVE)
    return Report(
        command=command,
        machine=describe_machine(),
        origin=origin,
        peers=peers,
        results=results,
        ratios=compare(gateway, naive, peers),
        targets=check_targets(gateway, naive, peers),
        load_average=None if load_start is None else (load_start, _load_average() or 0.0),
    )


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def measure(rig: Rig, system: str, args: BenchOptions) -> SystemResult:
    rig.flush()
    if system == GATEWAY:
        _say("starting 3 gateways")
        children = rig.start_gateways(profile_dir=args.profile)
    else:
        _say("starting 3 naive forwarders (baseline)")
        children = rig.start_naive()
    try:
        latency = None if args.skip_latency else measure_latency(rig, system, args, children)
        throughput = None
        if not args.skip_throughput:
            count = args.invalidations
            if system == NAIVE:
                count = min(count, args.naive_invalidations)
            throughput = measure_throughput(rig, system, count, children)
        for child in children:
            child.check_alive()
    finally:
        rig.stop(children)
    return SystemResult(throughput=throughput, latency=latency)


def measure_latency(rig: Rig, system: str, args: BenchOptions, children: list[Child]) -> Latency:
    prefix = f"{system}:lat"
    warmup = round(args.warmup * args.rate)
    total = warmup + round(args.duration * args.rate)
    _say(f"{system} latency: {total:,} invalidations at {args.rate:,.0f}/s")
    for region in REGIONS:
        populate(rig.port(region), prefix, total, use_debug=rig.debug_populate)
    commands = xadd_commands(STREAM, prefix, total)
    rig.keyspace_events("Eg")
    subscribers = rig.start_subscribers(prefix)
    try:
        cpu_before = rig.cpu_times(children)
        sent_at, elapsed = produce_paced(rig.port(rig.origin), commands, args.rate)
        cpu_after = rig.cpu_times(children)
        wait_gone(rig.clients, keys_of(prefix, total - 1), timeout_s=60 + total / 1000)
        for client in rig.clients.values():
            client.publish(DEL_EVENTS, STOP)
        gone = {}
        for region, (child, out) in subscribers.items():
            child.wait(30)
            gone[region] = read_gone(out)
    finally:
        rig.stop([child for child, _ in subscribers.values()])
        rig.keyspace_events("")
    per_region, missing = {}, {}
    for region in REGIONS:
        latencies, missing[region] = gone_latencies(sent_at, gone[region], first=warmup)
        if latencies:
            per_region[region] = summarise(latencies)
    return Latency(
        system=system,
        offered_rate=args.rate,
        achieved_rate=len(sent_at) / elapsed,
        seconds=args.duration,
        measured=total - warmup,
        per_region=per_region,
        missing=missing,
        cpu_share={name: (cpu_after[name] - cpu_before[name]) / elapsed for name in cpu_after},
    )


def measure_throughput(rig: Rig, system: str, count: int, children: list[Child]) -> Throughput:
    prefix = f"{system}:tp"
    _say(f"{system} throughput: {count:,} invalidations, pipelined")
    for region in REGIONS:
        populate(rig.port(region), prefix, count, use_debug=rig.debug_populate)
    commands = xadd_commands(STREAM, prefix, count)
    cpu_before = rig.cpu_times(children)
    start, produced = produce_all(rig.port(rig.origin), commands)
    timeout = max(120.0, count / 1000)
    gone = wait_gone(rig.clients, keys_of(prefix, count - 1), timeout_s=timeout, poll_s=0.005)
    cpu_after = rig.cpu_times(children)
    for region, client in rig.clients.items():
        left = count_left(client, prefix)
        if left:
            log.warning("%s: %d keys left after the last ones went; waiting for them", region, left)
            while count_left(client, prefix):
                time.sleep(0.01)
            gone[region] = time.monotonic()
    per_region = {region: gone[region] - start for region in REGIONS}
    return Throughput(
        system=system,
        invalidations=count,
        keys_per_invalidation=2,
        produce_seconds=produced - start,
        seconds=max(per_region.values()),
        per_region_seconds=per_region,
        cpu_seconds={
            name: cpu_after[name] - cpu_before[name] for name in cpu_after if name in cpu_before
        },
    )


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


def _say(message: str) -> None:
    print(f"invalgw bench: {message}", file=sys.stderr, flush=True)
