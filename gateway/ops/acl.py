"""``invalgw acl``: the least-privilege Redis users of a topology, as ``ACL SETUSER`` lines.

For each region (one ``--config`` per region, or ``--regions DIR``) it prints what to run on that
region's Redis:

- the region's own gateway: the commands it uses, nothing administrative (no ``FLUSHALL``,
  ``CONFIG``, ``KEYS``, ``ACL``, ``DEBUG``, ``SHUTDOWN``…). Its keys are every key (``~*``) when
  the cache is the same Redis, since cache keys are anyone's; with a separate ``[cache]`` only the
  gateway's namespace and stream, plus a cache user on the cache;
- one user per peer origin: only ``FCALL`` of the delivery function and the commands it runs
  (``HGET``/``HSET`` on the link's state, ``XADD`` on its mirror stream), on that origin's mirror
  stream and state only; ``TIME`` for clock sampling, ``PING``/``INFO`` for ``invalgw check``.
  The peer cannot read, delete, scan or run code of its own;
- producers: ``XADD`` on the region's stream, nothing else.

User names and passwords come from the URLs in the files (``redis://user:${PASS}@host``): a
password is printed only as its SHA-256 (``#…``), so the output can be pasted or kept. A URL
without credentials gets the default name (``invalgw-<region>``, ``invalgw-peer-<origin>``) and
``resetpass``: add a password (``>…``) before use. See docs/security.md.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from invalgw.cliargs import bind
from invalgw.config import RegionConfig, load_config, redact
from invalgw.names import Names

FUNCTION_LIBRARY = "invalgw"
"""The Redis Function library each gateway loads into its own Redis (FUNCTION LOAD REPLACE)."""
APPEND_FUNCTION = "invalgw_append"
"""The function peers call with FCALL to deliver an envelope into their mirror stream."""


def _commands(text: str) -> tuple[str, ...]:
    return tuple(text.split())


GATEWAY_COMMANDS = _commands(
    # connection and housekeeping
    "ping info time client|setname multi exec discard "
    # the delivery function, loaded by the gateway itself; scripts of its own (cache, lease)
    "function|load function|list fcall eval evalsha script|load script|exists "
    # streams: the local stream, mirrors, dead letters, gaps
    "xadd xreadgroup xack xautoclaim xclaim xpending xgroup|create xgroup|createconsumer "
    "xgroup|setid "  # a sender's cursor: its group moved past what the peer accepted
    "xgroup|setid "
    "xinfo|groups xinfo|stream xlen xrange xtrim "
    # state (epoch, links, lease, status) and the cache (unlink, soft expiry, fences, walks)
    "get set del unlink exists pexpire hget hset hgetall hdel scan"
)
CACHE_COMMANDS = _commands(
    "ping info client|setname eval evalsha script|load script|exists get set unlink pexpire scan"
)
CLUSTER_COMMANDS = _commands("cluster|slots cluster|shards command")
"""What the cluster client asks to learn the cluster's nodes and the keys of each command."""
PEER_COMMANDS = _commands("fcall hget hset xadd time ping info client|setname")
"""FCALL runs the function with the caller's rights: the peer needs the commands it runs
(HGET, HSET, XADD) on its two keys. TIME: clock sampling; PING, INFO: ``invalgw check``."""
PRODUCER_COMMANDS = _commands("xadd ping client|setname")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "acl",
        help="print the least-privilege ACL SETUSER lines for a topology's Redis servers",
        description=(
            "Print, for each region, the ACL SETUSER lines to run on its Redis: its gateway, "
            "one user per peer origin (FCALL of the delivery function on its own mirror "
            "stream only) and producers (XADD on the region's stream only). Give one --config "
            "per region (or --regions DIR) so that peer users match the peers' URLs."
        ),
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="a region's config file; give one per region of the topology",
    )
    parser.add_argument("--regions", metavar="DIR", help="every *.toml in DIR (e.g. regions)")
    parser.add_argument(
        "--producer-user",
        default="invalgw-producer",
        metavar="NAME",
        help="name of the producers' user (default: invalgw-producer)",
    )
    bind(parser, cmd_acl, AclOptions)


@dataclass(frozen=True)
class AclOptions:
    config: tuple[str, ...] = ()
    regions: str | None = None
    producer_user: str = "invalgw-producer"


def cmd_acl(args: AclOptions) -> int:
    paths = list(args.config)
    if args.regions:
        paths += sorted(str(path) for path in Path(args.regions).glob("*.toml"))
    if not paths:
        print("invalgw acl: give --config FILE (one per region) or --regions DIR", file=sys.stderr)
        return 2
    configs = [load_config(path) for path in paths]
    sys.stdout.write("\n".join(topology_acl(configs, producer_user=args.producer_user)) + "\n")
    return 0


def topology_acl(configs: list[RegionConfig], *, producer_user: str) -> list[str]:
    """Comment lines and ``ACL SETUSER`` lines, region by region."""
    lines: list[str] = []
    for config in configs:
        names = Names(config.streams.namespace, config.streams.local)
        lines.append(f"# {config.region}: run on {redact(config.redis.url)}")
        own = config.redis.url
        lines.append(
            "# the region's gateway"
            + (
                " (~*: the cache is this Redis, its keys are anyone's)"
                if config.cache is None
                else ""
            )
        )
        streams = [_keys(stream) for stream in config.local_streams]
        keys = ["~*"]
        if config.cache is not None:
            keys = [_keys(names.namespace) + ":*", *streams]
        cluster = CLUSTER_COMMANDS if config.redis.cluster else ()
        lines.append(_setuser(own, f"invalgw-{config.region}", GATEWAY_COMMANDS + cluster, keys))
        partitions = {peer.name: peer.partitions for peer in config.peers}
        for origin, url in _senders(config, configs):
            lines.append(f"# peer {origin}: delivers into its mirror streams here, nothing else")
            count = partitions.get(origin, 1)
            keys = [
                _keys(key)
                for q in (range(count) if count > 1 else [None])
                for key in (names.mirror(origin, q), names.mirror_state(origin, q))
            ]
            lines.append(_setuser(url, f"invalgw-peer-{origin}", PEER_COMMANDS + cluster, keys))
        lines.append("# producers: XADD into the region's stream, nothing else")
        lines.append(_setuser(None, producer_user, PRODUCER_COMMANDS + cluster, streams))
        if config.cache is not None:
            lines.append(f"# {config.region} cache: run on {redact(config.cache.url)}")
            commands = CACHE_COMMANDS + (CLUSTER_COMMANDS if config.cache.cluster else ())
            lines.append(
                _setuser(config.cache.url, f"invalgw-{config.region}-cache", commands, ["~*"])
            )
        lines.append("")
    return lines


def _senders(config: RegionConfig, configs: list[RegionConfig]) -> list[tuple[str, str | None]]:
    """Each region that delivers into ``config``'s Redis, with the URL it uses (None: unknown,
    its file was not given)."""
    by_name = {other.region: other for other in configs}
    senders: list[tuple[str, str | None]] = []
    for peer in config.peers:
        other = by_name.get(peer.name)
        url = None
        if other is not None:
            url = next((p.url for p in other.peers if p.name == config.region), None)
            if url is None:
                continue  # that region does not deliver here
        senders.append((peer.name, url))
    return senders


def _setuser(url: str | None, default_name: str, commands: tuple[str, ...], keys: list[str]) -> str:
    user, secret = _credentials(url)
    password = f"#{hashlib.sha256(secret.encode()).hexdigest()}" if secret else "resetpass"
    allowed = " ".join(f"+{command}" for command in commands)
    return (
        f"ACL SETUSER {user or default_name} reset on {password} resetchannels -@all {allowed} "
        + " ".join(keys)
    )


def _credentials(url: str | None) -> tuple[str | None, str | None]:
    if url is None:
        return None, None
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return user, password


_GLOB = re.compile(r"([*?\[\]\\])")


def _keys(name: str) -> str:
    """An ACL key pattern for exactly ``name`` (its glob characters escaped)."""
    return "~" + _GLOB.sub(r"\\\1", name)
