"""``invalgw``: check a region's config, run its gateway, publish invalidations, run the demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import anyio

from invalgw import __version__
from invalgw.config import RedisEndpoint, RegionConfig, load_config, redact
from invalgw.connections import close, connect, connect_sync, probe
from invalgw.errors import ConfigError, GatewayError, RedisUnreachable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = _unwrapped(args.command, args)
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


def _unwrapped(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``command``; an error of ours raised inside a task group comes out on its own."""
    try:
        return command(args)
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
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check", help="validate a region config and reach every Redis it names"
    )
    check.add_argument("--config", required=True, metavar="FILE", help="regions/<name>.toml")
    check.set_defaults(command=cmd_check)

    run = commands.add_parser("run", help="run a region's gateway until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, metavar="FILE", help="regions/<name>.toml")
    run.set_defaults(command=cmd_run)

    publish = commands.add_parser(
        "publish", help="invalidate keys in every region (one XADD into this region's stream)"
    )
    publish.add_argument("--config", required=True, metavar="FILE", help="regions/<name>.toml")
    publish.add_argument(
        "--unlink-local",
        action="store_true",
        help="also UNLINK the keys in this region's cache before returning (read-your-writes)",
    )
    publish.add_argument("--source", help="name of the producing service, kept for tracing")
    publish.add_argument("keys", nargs="+", metavar="KEY")
    publish.set_defaults(command=cmd_publish)

    from invalgw.dev import bench, demo, wanproxy
    from invalgw.ops import acl, lag, probe

    acl.add_parser(commands)
    lag.add_parser(commands)
    demo.add_parser(commands)
    bench.add_parser(commands)
    probe.add_parser(commands)
    wanproxy.add_parser(commands)
    return parser


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: valid config for region {config.region}")
    return anyio.run(_reach_all, config)


async def _reach_all(config: RegionConfig) -> int:
    targets = [(f"{config.region} (redis)", config.redis)]
    if config.cache is not None:
        targets.append((f"{config.region} (cache)", config.cache))
    targets += [(f"peer {peer.name}", peer) for peer in config.peers]
    results: dict[str, str] = {}

    async def reach(label: str, endpoint: RedisEndpoint) -> None:
        client = connect(endpoint, name=f"invalgw:{config.region}:check")
        try:
            version = await probe(client, label=label, url=endpoint.url)
            results[label] = f"ok    {label}: {redact(endpoint.url)} (Redis {version})"
        except RedisUnreachable as exc:
            results[label] = f"FAIL  {exc}"
        finally:
            await close(client)

    async with anyio.create_task_group() as tg:
        for label, endpoint in targets:
            tg.start_soon(reach, label, endpoint)
    failed = False
    for label, _ in targets:
        print(results[label])
        failed |= results[label].startswith("FAIL")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from invalgw.service import serve

    config = load_config(args.config)
    return anyio.run(serve, config)


def cmd_publish(args: argparse.Namespace) -> int:
    from invalgw.producer import SyncInvalidator

    config = load_config(args.config)
    if args.unlink_local and config.cache is not None:
        _unlink(config.cache, args.keys, name=f"invalgw:{config.region}:publish")
    client = connect_sync(config.redis, name=f"invalgw:{config.region}:publish")
    try:
        invalidator = SyncInvalidator(client, stream=config.streams.local, source=args.source)
        unlink_here = args.unlink_local and config.cache is None
        entry_id = invalidator.invalidate(*args.keys, unlink_local=unlink_here)
    except Exception as exc:
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
