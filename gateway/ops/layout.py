"""``invalgw check`` on a region's stream layout: is the stream Redis what ``[redis] cluster``
says, and does a stream of another partition layout still hold entries nobody has applied?

Changing ``[streams] partitions`` moves every producer to new streams at once; entries still
waiting in the old ones are applied and sent only by a gateway that runs the old layout. So the
check names every such stream, and the operator keeps the old layout's gateway running until
``check`` passes (see docs/configuration.md, "Changing the number of partitions").
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import RedisCluster

from invalgw.config import RegionConfig
from invalgw.connections import AsyncRedis, close, connect, connect_cache
from invalgw.proto import WILDCARDS


def _escaped(name: str) -> str:
    """``name`` as a literal inside a SCAN MATCH glob."""
    return "".join(f"\\{char}" if char in WILDCARDS else char for char in name)


async def layout_problems(config: RegionConfig) -> list[str]:
    """What is wrong with the region's stream layout in its Redis (empty: nothing)."""
    problems: list[str] = []
    seed = connect(config.redis, name=f"invalgw:{config.region}:check")
    try:
        info = await seed.info("cluster")
    finally:
        await close(seed)
    is_cluster = bool(info.get("cluster_enabled"))
    if is_cluster != config.redis.cluster:
        actual = "a Redis Cluster" if is_cluster else "not a Redis Cluster"
        problems.append(f"redis.cluster: the stream Redis is {actual}; set cluster = {is_cluster}")
        return problems
    client: AsyncRedis | RedisCluster = (
        connect_cache(config.redis, name=f"invalgw:{config.region}:check")
        if is_cluster
        else connect(config.redis, name=f"invalgw:{config.region}:check")
    )
    try:
        for stream in await _other_layout_streams(client, config):
            waiting = await _waiting(client, stream)
            if waiting:
                problems.append(
                    f"streams.partitions: stream {stream!r} of another partition layout still "
                    f"holds entries not applied or sent ({waiting}); run a gateway of that "
                    "layout until it is drained"
                )
    finally:
        await close(client)
    return problems


async def _other_layout_streams(
    client: AsyncRedis | RedisCluster, config: RegionConfig
) -> list[str]:
    """Streams named like the local stream or a partition of it, not of the configured layout."""
    local = config.streams.local
    found: set[str] = set()
    pattern = _escaped("{" + local + ":") + "*"
    async for key in client.scan_iter(match=pattern, count=1000, _type="stream"):
        found.add(key.decode("utf-8", "backslashreplace"))
    if await client.exists(local):
        found.add(local)
    return sorted(found - set(config.local_streams))


async def _waiting(client: AsyncRedis | RedisCluster, stream: str) -> str:
    """What the consumer groups of ``stream`` have not finished, as words (empty: nothing)."""
    groups: list[dict[str, Any]] = await client.xinfo_groups(stream)
    if not groups:
        length = int(await client.xlen(stream))
        return f"{length} entries, no consumer group" if length else ""
    parts = []
    for group in groups:
        pending, lag = int(group.get("pending") or 0), group.get("lag")
        if pending or lag is None or int(lag):
            name = group["name"].decode("utf-8", "backslashreplace")
            parts.append(f"group {name}: {pending} pending, {'?' if lag is None else lag} unread")
    return ", ".join(parts)
