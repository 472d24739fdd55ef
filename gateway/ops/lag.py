"""``invalgw lag``: every origin → region pair at a glance, read from the regions' Redis.

Works with any gateway stopped, since it reads what the gateways left in Redis (their status,
the consumer groups, dead letters and gaps). ``--watch`` redraws it; ``--json`` is for scripts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import anyio

from invalgw.config import RegionConfig, load_config
from invalgw.ops.lagtable import AUTH_FAILED, LagCollector, Snapshot, render_json, render_text
from invalgw.ops.terminal import Screen


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "lag",
        help="show backlog, lag, heartbeat age and link state of every origin → region pair",
        description=(
            "Read every region's Redis and print, for every origin → region pair, how "
            "invalidations are arriving. Give one --config per region (or --regions DIR)."
        ),
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE")
    parser.add_argument("--regions", metavar="DIR", help="every *.toml in DIR (e.g. regions)")
    parser.add_argument("--watch", action="store_true", help="redraw every --interval seconds")
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--no-color", action="store_true")
    parser.set_defaults(command=cmd_lag)


def cmd_lag(args: argparse.Namespace) -> int:
    paths = list(args.config)
    if args.regions:
        paths += sorted(str(path) for path in _region_files(args.regions))
    if not paths:
        print("invalgw lag: give --config FILE (one per region) or --regions DIR", file=sys.stderr)
        return 2
    configs = [load_config(path) for path in paths]
    try:
        return anyio.run(_lag, configs, args)
    except KeyboardInterrupt:
        return 0


def _region_files(directory: str) -> list[Path]:
    return list(Path(directory).glob("*.toml"))


async def _lag(configs: list[RegionConfig], args: argparse.Namespace) -> int:
    async with LagCollector.from_configs(configs) as collector:
        if not args.watch:
            snapshot = await collector.collect()
            _print(snapshot, args, None)
            for region in snapshot.regions:
                if region.error is not None and region.error.startswith(AUTH_FAILED):
                    print(
                        f"invalgw lag: {region.region}: {region.redis}: {region.error}",
                        file=sys.stderr,
                    )
            return 1 if not any(region.reachable for region in snapshot.regions) else 0
        screen = Screen(sys.stdout, color=_color(args))
        try:
            while True:
                snapshot = await collector.collect()
                _print(snapshot, args, screen)
                await anyio.sleep(args.interval)
        finally:
            screen.release()


def _color(args: argparse.Namespace) -> bool:
    return not args.no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()


def _print(snapshot: Snapshot, args: argparse.Namespace, screen: Screen | None) -> None:
    if args.json:
        sys.stdout.write(render_json(snapshot).decode() + "\n")
        sys.stdout.flush()
        return
    if screen is None:
        print("\n".join(render_text(snapshot, color=_color(args))))
        return
    screen.draw(render_text(snapshot, color=screen.color, width=screen.width))
