"""One cache node down stalls only its own keys: the rest of the stream is applied at once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import msgspec
import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from invalgw.cache import Cache
from invalgw.config import CacheEndpoint
from invalgw.connections import close
from invalgw.dev.localredis import RedisProcess
from invalgw.metrics import Metrics
from invalgw.producer import Invalidator
from tests.cluster import redis_cluster
from tests.conftest import REGIONS, clients, make_configs, metric, running, wait_until
from tests.servers import RedisServer, no_retry

pytestmark = pytest.mark.anyio

DOWN_S = 15.0
HEALTHY_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def cluster_nodes() -> Iterator[list[RedisProcess]]:
    with redis_cluster(3) as nodes:
        for node in nodes:  # the other primaries keep serving while one is down
            command(node, "CONFIG", "SET", "cluster-require-full-coverage", "no")
        yield nodes


def split_keys(
    cluster: RedisCluster, victim: RedisProcess, namespace: str, *, rounds: int
) -> tuple[list[list[str]], list[str]]:
    """Two keys on healthy nodes per round, and two keys per round on ``victim``."""
    healthy: list[list[str]] = [[] for _ in range(rounds)]
    sick: list[str] = []
    n = 0
    while min(len(keys) for keys in healthy) < 2 or len(sick) < 2 * rounds:
        key = f"{namespace}:k{n}"
        n += 1
        node = cluster.get_node_from_key(key)
        if node is not None and node.port == victim.port:
            if len(sick) < 2 * rounds:
                sick.append(key)
        elif len(healthy[n % rounds]) < 2:
            healthy[n % rounds].append(key)
    return healthy, sick


def command(node: RedisProcess, *args: str) -> Any:
    client = redis.Redis(
        port=node.port, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


def existing(node: RedisProcess, keys: list[str]) -> int:
    """How many of ``keys`` (all served by ``node``) exist, one command per key (slots)."""
    return sum(int(command(node, "EXISTS", key)) for key in keys)


async def test_a_stopped_primary_holds_back_only_its_own_keys(
    session_servers: list[RedisServer], cluster_nodes: list[RedisProcess], namespace: str
) -> None:
    urls = {region: server.url for region, server in zip(REGIONS, session_servers, strict=True)}
    configs = make_configs(urls, namespace)
    cache_url = f"redis://127.0.0.1:{cluster_nodes[0].port}/0"
    cache = CacheEndpoint(
        url=cache_url, cluster=True, socket_timeout_ms=500, connect_timeout_ms=300, retries=0
    )
    # down much longer than claim_idle_ms: held entries must not be taken over and re-read
    tuning = msgspec.structs.replace(
        configs["us-east"].gateway, claim_idle_ms=2000, claim_interval_ms=500
    )
    configs["us-east"] = msgspec.structs.replace(configs["us-east"], cache=cache, gateway=tuning)
    victim = cluster_nodes[2]
    cluster = RedisCluster(
        host="127.0.0.1", port=cluster_nodes[0].port, socket_timeout=2, retry=no_retry()
    )
    await cluster.initialize()

    healthy, sick = split_keys(cluster, victim, namespace, rounds=30)
    await cluster.mset_nonatomic(dict.fromkeys(sick + [k for ks in healthy for k in ks], "v"))
    command(victim, "CONFIG", "SET", "save", "3600 1")  # SIGTERM saves: it returns with its keys

    slowest = 0.0
    try:
        async with clients(configs) as by_region, running(configs, "us-east") as gateways:
            invalidator = Invalidator(by_region["us-east"], stream=configs["us-east"].streams.local)
            victim.stop()
            stopped = time.monotonic()
            for i in range(
                len(healthy)
            ):  # each entry: two keys on healthy nodes, two on the stopped one
                await invalidator.invalidate(*healthy[i], *sick[2 * i : 2 * i + 2])
                sent = time.monotonic()
                with anyio.fail_after(10):
                    while await cluster.exists(*healthy[i]):  # noqa: ASYNC110 - polling Redis
                        await anyio.sleep(0.01)
                slowest = max(slowest, time.monotonic() - sent)
                due = stopped + DOWN_S * (i + 1) / len(healthy)
                await anyio.sleep(max(0.0, due - time.monotonic()))
            victim.start()
            returned = time.monotonic()

            async def serving() -> bool:
                return b"cluster_state:ok" in command(victim, "CLUSTER", "INFO")

            await wait_until(serving, seconds=20, what="the node to serve again")
            assert existing(victim, sick) > 0, "the node came back with its keys"

            async def sick_gone() -> bool:
                return existing(victim, sick) == 0

            await wait_until(sick_gone, seconds=20, what="the stopped node's keys to go")
            back_after = time.monotonic() - returned
            reclaimed = metric(
                gateways["us-east"],
                "invalgw_entries_reclaimed_total",
                region="us-east",
                group="apply",
            )

            async def all_acknowledged() -> bool:
                stream = configs["us-east"].streams.local
                groups = await by_region["us-east"].xinfo_groups(stream)
                return bool(groups) and all(group["pending"] == 0 for group in groups)

            await wait_until(all_acknowledged, what="every entry to be acknowledged")
    finally:
        await close(cluster)
        if victim.process is None:
            victim.start()
    print(f"healthy keys: slowest {slowest:.3f} s; stopped node's keys {back_after:.1f} s after")
    assert slowest < HEALTHY_WITHIN_S
    assert back_after < 10
    assert reclaimed == 0, "held entries were taken over while their node was down"


async def test_keys_a_node_does_not_serve_are_redone_counted_and_removed_once(
    cluster_nodes: list[RedisProcess], namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stale slot map (resharding) sends keys to a node that does not serve them: the node
    refuses those keys only; they are redone through the cluster client, and every removed key
    is counted once."""
    client = RedisCluster(
        host="127.0.0.1", port=cluster_nodes[0].port, socket_timeout=2, retry=no_retry()
    )
    metrics = Metrics("us-east")
    cache = Cache(client, region="us-east", metrics=metrics)
    try:
        await client.initialize()
        keys = [f"{namespace}:r{i}" for i in range(300)]
        await client.mset_nonatomic(dict.fromkeys(keys[:200], "v"))  # 100 do not exist
        wrong = client.get_primaries()[0]
        monkeypatch.setattr(client, "get_node_from_key", lambda _key: wrong)
        removed = await cache.unlink(keys)
        assert removed == 200
        assert await client.exists(*keys) == 0
        redirected = metrics.registry.get_sample_value(
            "invalgw_cache_redirects_total", {"region": "us-east", "kind": "moved"}
        )
        assert redirected is not None
        assert redirected == sum(1 for key in keys if real_node(client, key) != wrong.name)
    finally:
        await close(client)


def real_node(client: RedisCluster, key: str) -> str:
    node = client.nodes_manager.get_node_from_slot(client.keyslot(key))
    return str(node.name)
