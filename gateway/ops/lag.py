"""``invalgw lag``: every origin → region pair at a glance, read from the regions' Redis.

Works with any gateway stopped, since it reads what the gateways left in Redis (their status,
the consumer groups, dead letters and gaps). ``--watch`` redraws it; ``--json`` is for scripts;
``--check`` / ``--fail-on`` exit 1 with one line per unhealthy pair (for cron and deploy gates).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec

from invalgw.cliargs import bind
from invalgw.config import RegionConfig, load_config
from invalgw.errors import ConfigError
from invalgw.ops.lagcheck import (
    BOUNDS,
    DEFAULT_FAIL_ON,
    CheckReport,
    Condition,
    parse_conditions,
    problems,
)
from invalgw.ops.lagtable import (
    AUTH_FAILED,
    STATES,
    LagCollector,
    Snapshot,
    render_json,
    render_text,
)
from invalgw.ops.terminal import Screen


@dataclass(frozen=True)
class LagOptions:
    config: tuple[str, ...] = ()
    regions: str | None = None
    watch: bool = False
    interval: float = 1.0
    json: bool = False
    no_color: bool = False
    check: bool = False
    partitions: bool = False
    fail_on: tuple[Condition, ...] | None = None

    @property
    def checking(self) -> bool:
        return self.check or self.fail_on is not None

    @property
    def conditions(self) -> tuple[Condition, ...]:
        return self.fail_on if self.fail_on is not None else parse_conditions(DEFAULT_FAIL_ON)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "lag",
        help="show backlog, lag, heartbeat age and link state of every origin → region pair",
        description=(
            "Read every region's Redis and print, for every origin → region pair, how "
            "invalidations are arriving. Give one --config per region (or --regions DIR). "
            "With --check or --fail-on, print only the unhealthy pairs and exit 1 if there is "
            "one (0 when all are healthy, 2 on a usage error)."
        ),
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="a region's config file; repeat it for every region",
    )
    parser.add_argument("--regions", metavar="DIR", help="every *.toml in DIR (e.g. regions)")
    parser.add_argument("--watch", action="store_true", help="redraw every --interval seconds")
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between redraws with --watch (default: 1)",
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument(
        "--partitions",
        action="store_true",
        help="also a row per partition of a partitioned origin, with the gateway process "
        "that owns it (its lease holder); --check then names unhealthy partitions too",
    )
    parser.add_argument(
        "--no-color", action="store_true", help="no ANSI colours (also when NO_COLOR is set)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 and name every unhealthy pair; unhealthy means: {DEFAULT_FAIL_ON}",
    )
    parser.add_argument(
        "--fail-on",
        type=_conditions,
        metavar="CONDITIONS",
        help="like --check, with your own comma-separated conditions: states "
        f"({', '.join(STATES)}) and bounds ({', '.join(b + '>N' for b in BOUNDS)}; "
        "backlog in entries, lag p99 and heartbeat age in seconds), e.g. "
        "'stale,silent,backlog>10000,lag>5'",
    )
    bind(parser, cmd_lag, LagOptions)


def _conditions(text: str) -> tuple[Condition, ...]:
    try:
        return parse_conditions(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_lag(options: LagOptions) -> int:
    paths = list(options.config)
    if options.regions:
        paths += sorted(str(path) for path in _region_files(options.regions))
    if not paths:
        print("invalgw lag: give --config FILE (one per region) or --regions DIR", file=sys.stderr)
        return 2
    if options.checking and options.watch:
        raise ConfigError("lag", ["--check and --fail-on run once; leave out --watch"])
    configs = [load_config(path) for path in paths]
    try:
        return anyio.run(_lag, configs, options)
    except KeyboardInterrupt:
        return 0


def _region_files(directory: str) -> list[Path]:
    return list(Path(directory).glob("*.toml"))


async def _lag(configs: list[RegionConfig], options: LagOptions) -> int:
    async with LagCollector.from_configs(configs, partitions=options.partitions) as collector:
        if options.checking:
            return _check(await collector.collect(), options)
        if not options.watch:
            snapshot = await collector.collect()
            _print(snapshot, options, None)
            for region in snapshot.regions:
                if region.error is not None and region.error.startswith(AUTH_FAILED):
                    print(
                        f"invalgw lag: {region.region}: {region.redis}: {region.error}",
                        file=sys.stderr,
                    )
            return 1 if not any(region.reachable for region in snapshot.regions) else 0
        screen = Screen(sys.stdout, color=_color(options))
        try:
            while True:
                snapshot = await collector.collect()
                _print(snapshot, options, screen)
                await anyio.sleep(options.interval)
        finally:
            screen.release()


def _check(snapshot: Snapshot, options: LagOptions) -> int:
    """One line per unhealthy pair (or a JSON report); 1 if there is one."""
    found = problems(snapshot, options.conditions)
    if options.json:
        report = CheckReport(
            ok=not found, fail_on=[str(c) for c in options.conditions], unhealthy=found
        )
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        for problem in found:
            print(problem.line())
    return 1 if found else 0


def _color(options: LagOptions) -> bool:
    return not options.no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()


def _print(snapshot: Snapshot, options: LagOptions, screen: Screen | None) -> None:
    if options.json:
        sys.stdout.write(render_json(snapshot).decode() + "\n")
        sys.stdout.flush()
        return
    if screen is None:
        print("\n".join(render_text(snapshot, color=_color(options))))
        return
    screen.draw(render_text(snapshot, color=screen.color, width=screen.width))
