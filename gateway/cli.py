"""``invalgw``: check a region's config, run its gateway, publish invalidations, run the demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec

from invalgw import __version__, logs
from invalgw.cliargs import bind, command_from
from invalgw.config import RedisEndpoint, RegionConfig, load_config, redact
from invalgw.connections import (
    REDIS_ERRORS,
    close,
    connect,
    connect_sync,
    connect_sync_any,
    probe,
)
from invalgw.errors import ConfigError, GatewayError, RedisUnreachable
from invalgw.proto.entry import OPS, Op

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
CONFIG_HELP = "the region's config file (regions/<name>.toml)"


@dataclass(frozen=True)
class CheckOptions:
    config: tuple[str, ...]
    json: bool = False
    offline: bool = False


@dataclass(frozen=True)
class RunOptions:
    config: str


@dataclass(frozen=True)
class PublishOptions:
    config: str
    keys: tuple[str, ...] = ()
    op: Op = "unlink"
    pattern: str | None = None
    version: int | None = None
    traceparent: str | None = None
    source: str | None = None
    unlink_local: bool = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        code: int = _unwrapped(command_from(args))
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"invalgw: {line}", file=sys.stderr)
        return EXIT_USAGE
    except GatewayError as exc:
        print(f"invalgw: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return code


def _unwrapped(command: Callable[[], int]) -> int:
    """Run ``command``; an error of ours raised inside a task group comes out on its own."""
    try:
        return command()
    except BaseExceptionGroup as group:
        ours = group.subgroup(GatewayError)
        if ours is None:
            raise
        first: BaseException = ours
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invalgw",
        description="Multi-region cache-invalidation gateway for Redis.",
    )
    parser.add_argument("--version", action="version", version=f"invalgw {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default: info)",
    )
    parser.add_argument(
        "--log-format",
        default=logs.default_format(),
        choices=logs.FORMATS,
        help="text, or json: one JSON object per line with time, level, logger, message and "
        f"fields such as region and peer (default: ${logs.ENV_FORMAT}, else text)",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="validate a region config and reach every Redis it names",
        description="Validate each region config, check that what it says of its peers' "
        "partitions matches their own files (given with it, or <peer>.toml next to it), and "
        "reach every Redis it names.",
    )
    check.add_argument(
        "--config",
        required=True,
        action="append",
        metavar="FILE",
        help=f"{CONFIG_HELP}; give it once per region to check several together",
    )
    check.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON object (one line per config), for scripts",
    )
    check.add_argument(
        "--offline",
        action="store_true",
        help="only validate the file; do not connect to the Redis servers it names",
    )
    bind(check, cmd_check, CheckOptions)

    run = commands.add_parser("run", help="run a region's gateway until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, metavar="FILE", help=CONFIG_HELP)
    bind(run, cmd_run, RunOptions)

    _publish_parser(commands)

    from invalgw.dev import bench, demo, wanproxy
    from invalgw.ops import acl, lag, probe

    acl.add_parser(commands)
    lag.add_parser(commands)
    demo.add_parser(commands)
    bench.add_parser(commands)
    probe.add_parser(commands)
    wanproxy.add_parser(commands)
    return parser


def _publish_parser(commands: Any) -> None:
    publish = commands.add_parser(
        "publish",
        help="invalidate keys in every region (one XADD into this region's stream)",
        description="Write one invalidation into this region's stream, exactly as a service "
        "would with redis-cli XADD (see proto/README.md), and print its entry ID.",
    )
    publish.add_argument("--config", required=True, metavar="FILE", help=CONFIG_HELP)
    publish.add_argument(
        "--op",
        default="unlink",
        choices=OPS,
        help="unlink (at once everywhere), expire (soft, staggered per region), hybrid "
        "(unlink here, expire elsewhere) or invalidate (each region's policy decides); "
        "default: unlink",
    )
    publish.add_argument(
        "--pattern",
        metavar="GLOB",
        help="invalidate every key matching GLOB (e.g. '{user:1001}:*') instead of KEYs",
    )
    publish.add_argument(
        "--version",
        type=_fence_version,
        metavar="N",
        help="the change's version: fills read at an older version are refused (fencing)",
    )
    publish.add_argument(
        "--traceparent",
        metavar="TRACEPARENT",
        help="W3C trace context, to join the gateways' spans to your trace",
    )
    publish.add_argument(
        "--source", help="name of the producing service, kept in the entry for tracing"
    )
    publish.add_argument(
        "--unlink-local",
        action="store_true",
        help="also UNLINK the keys in this region's cache before returning (read-your-writes)",
    )
    publish.add_argument("keys", nargs="*", metavar="KEY", help="the keys to invalidate")
    bind(publish, cmd_publish, PublishOptions)


def _fence_version(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def cmd_check(options: CheckOptions) -> int:
    from invalgw.ops.peerfiles import given, partition_mismatches

    configs = {path: load_config(path) for path in options.config}
    together = [given(path, config) for path, config in configs.items()]
    mismatched = [
        ConfigError(path, problems)
        for path, config in configs.items()
        if (problems := partition_mismatches(path, config, together))
    ]
    if mismatched:
        for error in mismatched:
            for line in str(error).splitlines():
                print(f"invalgw: {line}", file=sys.stderr)
        return EXIT_USAGE
    return max(_check_one(path, config, options) for path, config in configs.items())


def _check_one(path: str, config: RegionConfig, options: CheckOptions) -> int:
    """Report on one valid config: reach every Redis it names (unless ``--offline``)."""
    if not options.json:
        print(f"{path}: valid config for region {config.region}")
    results = [] if options.offline else anyio.run(_reach_all, config)
    failed = any(not result.ok for result in results)
    if options.json:
        report = {"config": path, "region": config.region, "ok": not failed}
        report["targets"] = [msgspec.structs.asdict(result) for result in results]
        print(msgspec.json.encode(report).decode())
    else:
        for result in results:
            print(result.line())
    return EXIT_FAILED if failed else EXIT_OK


class Reached(msgspec.Struct, kw_only=True):
    """Whether ``check`` reached one Redis of a region's config."""

    target: str
    url: str
    ok: bool
    redis_version: str | None = None
    error: str | None = None
    layout: str | None = None

    def line(self) -> str:
        if self.ok and self.layout:
            return f"ok    {self.target}: {self.layout}, none of another layout holds entries"
        if self.ok:
            return f"ok    {self.target}: {self.url} (Redis {self.redis_version})"
        return f"FAIL  {self.error}"


async def _reach_all(config: RegionConfig) -> list[Reached]:
    targets = [(f"{config.region} (redis)", config.redis)]
    if config.cache is not None:
        targets.append((f"{config.region} (cache)", config.cache))
    targets += [(f"peer {peer.name}", peer) for peer in config.peers]
    results: dict[str, Reached] = {}

    async def reach(label: str, endpoint: RedisEndpoint) -> None:
        client = connect(endpoint, name=f"invalgw:{config.region}:check")
        url = redact(endpoint.url)
        try:
            version = await probe(client, label=label, url=endpoint.url)
            results[label] = Reached(target=label, url=url, ok=True, redis_version=version)
        except RedisUnreachable as exc:
            results[label] = Reached(target=label, url=url, ok=False, error=str(exc))
        finally:
            await close(client)

    async with anyio.create_task_group() as tg:
        for label, endpoint in targets:
            tg.start_soon(reach, label, endpoint)
    reached = [results[label] for label, _ in targets]
    if reached[0].ok:
        reached += await _layout(config)
    return reached


async def _layout(config: RegionConfig) -> list[Reached]:
    """The stream layout in the region's Redis (see :mod:`invalgw.ops.layout`)."""
    from invalgw.ops.layout import layout_problems

    label, url = f"{config.region} (streams)", redact(config.redis.url)
    try:
        problems = await layout_problems(config)
    except REDIS_ERRORS as exc:
        problems = [f"cannot read the stream layout: {exc}"]
    partitions = config.streams.partitions
    if not problems and (partitions > 1 or config.redis.cluster):
        return [Reached(target=label, url=url, ok=True, layout=f"{partitions} partitions")]
    return [Reached(target=label, url=url, ok=False, error=f"{label}: {p}") for p in problems]


def cmd_run(options: RunOptions) -> int:
    from invalgw.service import serve

    config = load_config(options.config)
    return anyio.run(serve, config)


def cmd_publish(options: PublishOptions) -> int:
    from invalgw.producer import SyncInvalidator

    if bool(options.keys) == bool(options.pattern):
        raise ConfigError("publish", ["give the KEYs to invalidate, or --pattern (not both)"])
    config = load_config(options.config)
    unlink_cache = options.unlink_local and config.cache is not None and options.keys
    if unlink_cache and config.cache is not None:
        _unlink(config.cache, list(options.keys), name=f"invalgw:{config.region}:publish")
    client = connect_sync_any(config.redis, name=f"invalgw:{config.region}:publish")
    try:
        invalidator = SyncInvalidator(
            client,
            stream=config.streams.local,
            source=options.source,
            partitions=config.streams.partitions,
        )
        entry_id = invalidator.invalidate(
            *options.keys,
            op=options.op,
            pattern=options.pattern,
            version=options.version,
            traceparent=options.traceparent,
            unlink_local=options.unlink_local and config.cache is None,
        )
    except ValueError as exc:  # an empty key, say: nothing was written
        raise ConfigError("publish", [str(exc)]) from None
    except REDIS_ERRORS as exc:
        raise RedisUnreachable(f"{config.region}: {redact(config.redis.url)}: {exc}") from None
    finally:
        client.close()
    print(entry_id)
    return EXIT_OK


def _unlink(endpoint: RedisEndpoint, keys: list[str], *, name: str) -> None:
    """UNLINK ``keys`` in a region cache that is not the stream's Redis (``[cache]``)."""
    client = connect_sync(endpoint, name=name)
    try:
        client.unlink(*keys)
    except Exception as exc:
        raise RedisUnreachable(f"cache: {redact(endpoint.url)}: {exc}") from None
    finally:
        client.close()
