"""Pattern invalidations end to end: large walks of a region's cache, standalone and Redis Cluster.

A walk of 200,000 matching keys runs in bounded SCAN batches in the background, removes exactly
the matching keys, and does not hold up the ordinary invalidations written meanwhile: their lag
is measured, one every 50 ms, while the walk runs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from invalgw.config import CacheEndpoint, RegionConfig
from invalgw.connections import close
from invalgw.dev.localredis import RedisProcess
from invalgw.names import Names
from invalgw.proto import entry_fields
from invalgw.service import Gateway
from tests.cluster import redis_cluster
from tests.conftest import REGIONS, clients, make_configs, metric, running, wait_until
from tests.processes import Processes
from tests.servers import RedisServer, no_retry

pytestmark = pytest.mark.anyio

WALKED_KEYS = 200_000
KEPT_KEYS = 2_000
LIVE_EVERY_S = 0.05
"""One ordinary invalidation every 50 ms while the walk runs."""
CRASH_KEYS = 100_000
"""Enough for a walk of a few hundred ms: the test kills the gateway within ~10 ms of its start."""
MAX_LIVE_LAG_S = 0.5
"""Bound on each one's lag during a walk; measured well under 0.1 s on 2 busy cores."""


def urls_of(servers: list[RedisServer]) -> dict[str, str]:
    return {region: server.url for region, server in zip(REGIONS, servers, strict=True)}


@pytest.fixture(scope="module")
def cluster_nodes() -> Iterator[list[RedisProcess]]:
    with redis_cluster(3) as nodes:
        yield nodes


@pytest.fixture
async def cluster_client(cluster_nodes: list[RedisProcess]) -> AsyncIterator[RedisCluster]:
    client = RedisCluster(
        host="127.0.0.1",
        port=cluster_nodes[0].port,
        socket_timeout=5,
        socket_connect_timeout=2,
        retry=no_retry(),
    )
    try:
        yield client
    finally:
        await close(client)


def node_clients(nodes: list[RedisProcess]) -> list[redis.asyncio.Redis]:
    return [
        redis.asyncio.Redis(
            port=node.port, socket_timeout=10, socket_connect_timeout=2, retry=no_retry()
        )
        for node in nodes
    ]


async def slot_owners(nodes: list[redis.asyncio.Redis]) -> dict[int, redis.asyncio.Redis]:
    """Which node serves each hash slot (read from CLUSTER SLOTS)."""
    by_port = {client.connection_pool.connection_kwargs["port"]: client for client in nodes}
    owners: dict[int, redis.asyncio.Redis] = {}
    slots: Any = await nodes[0].execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
    for start, end, primary, *_ in slots:
        for slot in range(int(start), int(end) + 1):
            owners[slot] = by_port[int(primary[1])]
    return owners


async def populate(client: redis.asyncio.Redis, keys: Sequence[str], chunk: int = 5000) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for start in range(0, len(keys), chunk):
            pipe.mset(dict.fromkeys(keys[start : start + chunk], "cached"))
        await pipe.execute()


def by_node(
    owners: dict[int, redis.asyncio.Redis], keys: Sequence[str]
) -> dict[redis.asyncio.Redis, list[list[str]]]:
    """``keys`` grouped by hash slot, the groups by the node that serves them."""
    by_slot: dict[int, list[str]] = defaultdict(list)
    for key in keys:
        by_slot[key_slot(key.encode())].append(key)
    nodes: dict[redis.asyncio.Redis, list[list[str]]] = defaultdict(list)
    for slot, slot_keys in by_slot.items():
        nodes[owners[slot]].append(slot_keys)
    return nodes


async def populate_cluster(nodes: list[redis.asyncio.Redis], keys: Sequence[str]) -> None:
    """SET ``keys`` on a cluster fast: one MSET per hash slot, one pipeline per node."""
    for node, slot_groups in by_node(await slot_owners(nodes), keys).items():
        async with node.pipeline(transaction=False) as pipe:
            for group in slot_groups:
                pipe.mset(dict.fromkeys(group, "cached"))
            await pipe.execute()


async def count_existing(client: redis.asyncio.Redis, keys: Sequence[str]) -> int:
    """How many of ``keys`` exist (multi-key EXISTS, pipelined)."""
    async with client.pipeline(transaction=False) as pipe:
        for start in range(0, len(keys), 1000):
            pipe.exists(*keys[start : start + 1000])
        return sum(int(n) for n in await pipe.execute())


async def count_existing_cluster(nodes: list[redis.asyncio.Redis], keys: Sequence[str]) -> int:
    """:func:`count_existing` on a cluster: one EXISTS per hash slot, one pipeline per node."""
    owners = await slot_owners(nodes)
    total = 0
    for node, slot_groups in by_node(owners, keys).items():
        async with node.pipeline(transaction=False) as pipe:
            for group in slot_groups:
                pipe.exists(*group)
            total += sum(int(n) for n in await pipe.execute())
    return total


async def command_calls(client: redis.asyncio.Redis, command: str) -> int:
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def pattern_metric(gateway: Gateway, name: str, origin: str = "us-east") -> float:
    return metric(gateway, name, region=gateway.config.region, origin=origin)


@dataclass
class LiveTraffic:
    """Ordinary invalidations written in us-east at a steady rate; the lag until each key is
    gone from the watched region's cache, as seen by the test (polled every 5 ms)."""

    prefix: str
    lags_s: list[tuple[float, float]] = field(default_factory=list)
    """(time written, lag) per invalidation, on the test's monotonic clock."""

    def during(self, start: float, end: float) -> list[float]:
        return [lag for written, lag in self.lags_s if start <= written <= end]

    async def run(
        self,
        cache: redis.asyncio.Redis | RedisCluster,
        origin: redis.asyncio.Redis,
        stream: str,
        stop: anyio.Event,
    ) -> None:
        outstanding: dict[str, float] = {}
        next_write = time.monotonic()
        n = 0
        while not stop.is_set() or outstanding:
            now = time.monotonic()
            if now >= next_write and not stop.is_set():
                key = f"{self.prefix}:{n}"
                n += 1
                await cache.set(key, "cached")
                written = time.monotonic()
                await origin.xadd(stream, entry_fields([key]))  # type: ignore[arg-type]
                outstanding[key] = written
                next_write += LIVE_EVERY_S
            for key, written in list(outstanding.items()):
                if not await cache.exists(key):
                    self.lags_s.append((written, time.monotonic() - written))
                    del outstanding[key]
            if outstanding and time.monotonic() - min(outstanding.values()) > 10:
                raise AssertionError(f"an ordinary invalidation is not applied after 10 s: {n}")
            await anyio.sleep(0.005)


@dataclass
class Walk:
    seconds: float
    live_lags_s: list[float]
    redis_errors: float
    """Failed Redis calls counted by any gateway during the walk (a stage that stalls)."""


async def walk_while_live(
    configs: dict[str, RegionConfig],
    region: str,
    cache: redis.asyncio.Redis | RedisCluster,
    pattern: str,
    live_prefix: str,
) -> tuple[Walk, dict[str, Gateway]]:
    """Run the gateways, write ``pattern`` in us-east, and ordinary invalidations meanwhile;
    return how long ``region``'s walk took and the lags of the invalidations written during it."""
    traffic = LiveTraffic(live_prefix)
    stop = anyio.Event()
    stream = configs["us-east"].streams.local
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        east = redis_by_region["us-east"]
        gateway = gateways[region]
        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic.run, cache, east, stream, stop)
            await anyio.sleep(0.3)  # ordinary traffic flowing before the walk starts
            started = time.monotonic()
            await east.xadd(stream, entry_fields(pattern=pattern))  # type: ignore[arg-type]

            async def walked() -> bool:
                return pattern_metric(gateway, "invalgw_pattern_invalidations_total") == 1

            await wait_until(walked, seconds=60, interval=0.005, what=f"the walk in {region}")
            ended = time.monotonic()
            stop.set()
    errors = sum(
        metric(gw, "invalgw_redis_errors_total", region=name, target=target)
        for name, gw in gateways.items()
        for target in REGIONS
    )
    return Walk(ended - started, traffic.during(started, ended), errors), gateways


async def test_a_walk_of_200k_keys_on_a_standalone_cache(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """us-east's own cache (the writer's region, local apply)."""
    configs = make_configs(urls_of(session_servers), namespace)
    walked = [f"{namespace}:pat:{i}" for i in range(WALKED_KEYS)]
    kept = [f"{namespace}:keep:{i}" for i in range(KEPT_KEYS)]
    cache = redis.asyncio.Redis.from_url(
        configs["us-east"].redis.url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
    )
    try:
        await populate(cache, walked + kept)
        scans, keys_calls = await command_calls(cache, "scan"), await command_calls(cache, "keys")
        walk, gateways = await walk_while_live(
            configs, "us-east", cache, f"{namespace}:pat:*", f"{namespace}:live"
        )
        assert await count_existing(cache, walked) == 0
        assert await count_existing(cache, kept) == KEPT_KEYS
        assert set(await cache.eval(TTLS, len(kept), *kept)) == {-1}
        scan_calls = await command_calls(cache, "scan") - scans
        assert await command_calls(cache, "keys") == keys_calls
    finally:
        await close(cache)
    east = gateways["us-east"]
    assert pattern_metric(east, "invalgw_pattern_keys_total") == WALKED_KEYS
    assert pattern_metric(east, "invalgw_pattern_keys_removed_total") == WALKED_KEYS
    assert scan_calls >= WALKED_KEYS // 1000  # bounded batches (COUNT 1000), never KEYS
    check_live_lags(walk, "standalone", scan_calls)


TTLS = "local t = {} for i, k in ipairs(KEYS) do t[i] = redis.call('PTTL', k) end return t"


def check_live_lags(walk: Walk, kind: str, scan_calls: int) -> None:
    assert walk.redis_errors == 0, "a stage failed during the walk"
    lags = walk.live_lags_s
    assert len(lags) >= 5, f"only {len(lags)} ordinary invalidations during a {walk.seconds} s walk"
    worst = max(lags)
    print(
        f"\n{kind}: walk of {WALKED_KEYS} keys in {walk.seconds:.2f} s ({scan_calls} SCAN calls); "
        f"{len(lags)} ordinary invalidations meanwhile, lag max {worst * 1000:.0f} ms, "
        f"median {sorted(lags)[len(lags) // 2] * 1000:.0f} ms"
    )
    assert worst < MAX_LIVE_LAG_S, f"an ordinary invalidation took {worst:.2f} s during the walk"


async def test_a_walk_of_200k_keys_on_a_cluster_cache(
    session_servers: list[RedisServer],
    cluster_nodes: list[RedisProcess],
    cluster_client: RedisCluster,
    namespace: str,
) -> None:
    """eu-west's cache is a 3-primary Redis Cluster (its stream Redis stays standalone); the
    pattern arrives through the mirror from us-east."""
    configs = make_configs(urls_of(session_servers), namespace)
    cluster_url = f"redis://127.0.0.1:{cluster_nodes[0].port}/0"
    configs["eu-west"] = msgspec.structs.replace(
        configs["eu-west"], cache=CacheEndpoint(url=cluster_url, cluster=True)
    )
    walked = [f"{namespace}:pat:{i}" for i in range(WALKED_KEYS)]
    kept = [f"{namespace}:keep:{i}" for i in range(KEPT_KEYS)]
    nodes = node_clients(cluster_nodes)
    try:
        await populate_cluster(nodes, walked + kept)
        before = [await command_calls(node, "scan") for node in nodes]
        walk, gateways = await walk_while_live(
            configs, "eu-west", cluster_client, f"{namespace}:pat:*", f"{namespace}:live"
        )
        assert await count_existing_cluster(nodes, walked) == 0
        assert await count_existing_cluster(nodes, kept) == KEPT_KEYS
        after = [await command_calls(node, "scan") for node in nodes]
        scan_calls = [n - m for n, m in zip(after, before, strict=True)]
    finally:
        for node in nodes:
            await close(node)
    west = gateways["eu-west"]
    assert pattern_metric(west, "invalgw_pattern_keys_total") == WALKED_KEYS
    assert all(calls >= 10 for calls in scan_calls), f"not every primary was walked: {scan_calls}"
    check_live_lags(walk, "cluster", sum(scan_calls))


async def test_a_hash_tag_group_on_a_cluster_is_walked_on_its_node_only(
    session_servers: list[RedisServer],
    cluster_nodes: list[RedisProcess],
    cluster_client: RedisCluster,
    namespace: str,
) -> None:
    configs = make_configs(urls_of(session_servers), namespace)
    cluster_url = f"redis://127.0.0.1:{cluster_nodes[0].port}/0"
    configs["eu-west"] = msgspec.structs.replace(
        configs["eu-west"], cache=CacheEndpoint(url=cluster_url, cluster=True)
    )
    group = [f"{{{namespace}:user:1001}}:{i}" for i in range(500)]
    neighbour = [f"{{{namespace}:user:1002}}:{i}" for i in range(500)]
    nodes = node_clients(cluster_nodes)
    try:
        owner = (await slot_owners(nodes))[key_slot(group[0].encode())]
        await cluster_client.mset(dict.fromkeys(group, "cached"))
        await cluster_client.mset(dict.fromkeys(neighbour, "cached"))
        before = [await command_calls(node, "scan") for node in nodes]
        async with clients(configs) as redis_by_region, running(configs) as gateways:
            stream = configs["us-east"].streams.local
            pattern = f"{{{namespace}:user:1001}}:*"
            await redis_by_region["us-east"].xadd(stream, entry_fields(pattern=pattern))  # type: ignore[arg-type]

            async def walked() -> bool:
                gateway = gateways["eu-west"]
                return pattern_metric(gateway, "invalgw_pattern_invalidations_total") == 1

            await wait_until(walked, what="the group walk in eu-west")
        assert await cluster_client.exists(*group) == 0
        assert await cluster_client.exists(*neighbour) == len(neighbour)
        scans = {
            id(node): await command_calls(node, "scan") - n
            for node, n in zip(nodes, before, strict=True)
        }
    finally:
        for node in nodes:
            await close(node)
    assert pattern_metric(gateways["eu-west"], "invalgw_pattern_keys_total") == len(group)
    assert scans.pop(id(owner)) >= 1
    assert set(scans.values()) == {0}  # the other primaries were not walked at all


async def test_an_entry_batch_of_one_pattern_is_acknowledged_when_walked_without_errors(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """A pattern entry read on its own leaves nothing to acknowledge at once: the stage must save
    its status and go on (not fail, back off and hold up the invalidations behind it)."""
    configs = make_configs(urls_of(session_servers), namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    keys = [f"{namespace}:alone:{i}" for i in range(100)]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        for client in redis_by_region.values():
            await populate(client, keys)
        east = redis_by_region["us-east"]
        await east.xadd(names.local_stream, entry_fields(pattern=f"{namespace}:alone:*"))  # type: ignore[arg-type]

        async def walked() -> bool:
            return all(
                pattern_metric(gw, "invalgw_pattern_invalidations_total") == 1
                for gw in gateways.values()
            )

        await wait_until(walked, what="the walk in every region")
        for region, client in redis_by_region.items():
            assert await count_existing(client, keys) == 0, region
        streams = {"us-east": names.local_stream} | {
            peer: names.mirror("us-east") for peer in ("eu-west", "ap-south")
        }

        async def acknowledged() -> bool:
            for region, stream in streams.items():
                summary = await redis_by_region[region].xpending(stream, "apply")
                if summary["pending"]:
                    return False
            return True

        await wait_until(acknowledged, what="the pattern entry acknowledged everywhere")
    errors = {
        name: metric(gw, "invalgw_redis_errors_total", region=name, target=name)
        for name, gw in gateways.items()
    }
    assert set(errors.values()) == {0}, errors


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("region", "cluster"),
    [("us-east", False), ("eu-west", False), ("eu-west", True)],
    ids=["local", "mirror", "mirror-cluster-cache"],
)
async def test_a_walk_cut_short_by_sigkill_is_redone_on_restart(
    request: pytest.FixtureRequest,
    session_servers: list[RedisServer],
    namespace: str,
    processes: Processes,
    region: str,
    cluster: bool,
) -> None:
    """The walk's entry is acknowledged only when the walk is complete: a gateway killed half
    way (SIGKILL: nothing drained) finds it pending when it starts again, and walks again; with
    a cluster cache, the walk is then the first thing its fresh cluster client does."""
    configs = make_configs(urls_of(session_servers), namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    stream = names.local_stream if region == "us-east" else names.mirror("us-east")
    walked = [f"{namespace}:pat:{i}" for i in range(CRASH_KEYS)]
    kept = [f"{namespace}:keep:{i}" for i in range(KEPT_KEYS)]
    sample = walked[::100]  # SCAN visits keys in hash order: a spread sample shows progress
    nodes: list[redis.asyncio.Redis] = []
    if cluster:
        cluster_nodes: list[RedisProcess] = request.getfixturevalue("cluster_nodes")
        url = f"redis://127.0.0.1:{cluster_nodes[0].port}/0"
        configs[region] = msgspec.structs.replace(
            configs[region], cache=CacheEndpoint(url=url, cluster=True)
        )
        nodes = node_clients(cluster_nodes)
    async with clients(configs) as redis_by_region:
        client = redis_by_region[region]

        async def existing(keys: Sequence[str]) -> int:
            if cluster:
                return await count_existing_cluster(nodes, keys)
            return await count_existing(client, keys)

        try:
            await (
                populate_cluster(nodes, walked + kept)
                if cluster
                else populate(client, walked + kept)
            )
            gateways = await anyio.to_thread.run_sync(processes.start_all, configs)
            await redis_by_region["us-east"].xadd(
                names.local_stream,
                entry_fields(pattern=f"{namespace}:pat:*"),  # type: ignore[arg-type]
            )

            async def started() -> bool:
                return await existing(sample) < len(sample)

            await wait_until(started, interval=0.005, what=f"the walk to start in {region}")
            gateways[region].kill()
            left = await existing(walked)
            assert 0 < left < len(walked), f"the walk was not cut short: {left} keys left"
            info = await client.xinfo_groups(stream)
            assert [group["pending"] for group in info if group["name"] == b"apply"] == [1]

            restarted = processes.add(region, configs[region]).start()
            await anyio.to_thread.run_sync(restarted.wait_ready)

            async def all_walked() -> bool:
                return await existing(walked) == 0

            await wait_until(all_walked, seconds=30, what=f"every matching key gone in {region}")
            assert await existing(kept) == KEPT_KEYS

            async def acknowledged() -> bool:
                summary = await client.xpending(stream, "apply")
                return int(summary["pending"]) == 0

            await wait_until(acknowledged, what="the pattern entry acknowledged")
        finally:
            for node in nodes:
                await close(node)
    assert "walking the cache" in restarted.log()
    print(
        f"\n{request.node.callspec.id}: killed with {left} of {len(walked)} keys left; walked again"
    )
