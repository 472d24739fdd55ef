"""Resharding the stream cluster under a running gateway: it follows MOVED without a restart.

us-east's stream Redis (and cache) is a local 3-primary Redis Cluster, its stream in P = 4
partitions; eu-west is a standalone Redis. While both gateways run and invalidations keep coming,
one partition's slot is migrated, keys and all, to another primary, as ``redis-cli --cluster
reshard`` does (SETSLOT IMPORTING / MIGRATING, MIGRATE the keys, SETSLOT NODE on every node).
Every invalidation written before, during and after the move is applied in both regions, and the
gateway counts the partition it restarted on the new node. A cluster of its own: the test changes
which node serves a slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from invalgw.config import RegionConfig
from invalgw.connections import close
from invalgw.dev.localredis import RedisProcess
from invalgw.names import APPLY_GROUP, Names
from invalgw.producer import Invalidator
from invalgw.proto import partition_of
from tests.cluster import cluster_client, redis_cluster
from tests.conftest import make_configs, metric, running, wait_gone, wait_until
from tests.servers import RedisServer, no_retry

pytestmark = pytest.mark.anyio

P = 4


@pytest.fixture(scope="module")
def cluster_nodes() -> Iterator[list[RedisProcess]]:
    with redis_cluster(3) as nodes:
        yield nodes


@pytest.fixture
def two_regions(
    cluster_nodes: list[RedisProcess], session_servers: list[RedisServer], namespace: str
) -> dict[str, RegionConfig]:
    cluster_url = f"redis://127.0.0.1:{cluster_nodes[0].port}/0"
    configs = make_configs({"us-east": cluster_url, "eu-west": session_servers[1].url}, namespace)
    us_east, eu_west = configs["us-east"], configs["eu-west"]
    us_east = msgspec.structs.replace(
        us_east,
        redis=msgspec.structs.replace(us_east.redis, cluster=True),
        streams=msgspec.structs.replace(us_east.streams, partitions=P),
    )
    peer = msgspec.structs.replace(eu_west.peers[0], partitions=P, cluster=True)
    return {"us-east": us_east, "eu-west": msgspec.structs.replace(eu_west, peers=[peer])}


@pytest.fixture
async def cluster(cluster_nodes: list[RedisProcess]) -> AsyncIterator[RedisCluster]:
    client = cluster_client(cluster_nodes[0])
    yield client
    await close(client)


class Nodes:
    """Admin clients of each primary, by port."""

    def __init__(self, nodes: list[RedisProcess]) -> None:
        self.clients = {
            node.port: redis.asyncio.Redis(
                port=node.port, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
            )
            for node in nodes
        }

    async def call(self, port: int, *args: Any) -> Any:
        return await self.clients[port].execute_command(*args)

    async def aclose(self) -> None:
        for client in self.clients.values():
            await close(client)


class Phases:
    """Invalidations of fresh cached keys, a few in every partition, one phase at a time."""

    def __init__(
        self, cluster: RedisCluster, standalone: redis.asyncio.Redis, producer: Invalidator
    ) -> None:
        self.cluster, self.standalone, self.producer = cluster, standalone, producer
        self.keys: list[str] = []

    async def write(self, prefix: str, count: int = 16) -> None:
        keys = [f"{prefix}:{n}" for n in range(count)]
        assert len({partition_of(key, P) for key in keys}) == P
        for key in keys:
            await self.cluster.set(key, "cached")
            await self.standalone.set(key, "cached")
        for key in keys:
            await self.producer.invalidate(key)
        self.keys += keys


async def test_a_partition_whose_slot_moves_goes_on_on_the_new_primary(
    two_regions: dict[str, RegionConfig],
    cluster: RedisCluster,
    cluster_nodes: list[RedisProcess],
    namespace: str,
) -> None:
    us_east, eu_west = two_regions["us-east"], two_regions["eu-west"]
    names = Names(us_east.streams.namespace, us_east.streams.local).partition(0, P)
    await cluster.initialize()
    slot = cluster.keyslot(names.local_stream)
    source = cluster.get_node_from_key(names.local_stream)
    assert source is not None
    target = next(node.port for node in cluster_nodes if node.port != source.port)
    nodes = Nodes(cluster_nodes)
    standalone = redis.asyncio.Redis.from_url(
        eu_west.redis.url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
    )
    phases = Phases(
        cluster, standalone, Invalidator(cluster, stream=us_east.streams.local, partitions=P)
    )
    ids = {port: (await nodes.call(port, "CLUSTER", "MYID")).decode() for port in nodes.clients}
    try:
        async with running(two_regions) as gateways:
            east = gateways["us-east"]
            assert metric(east, "invalgw_partition_reroutes_total", **MOVED) == 0
            await phases.write(f"{namespace}:before")
            await wait_gone(standalone, phases.keys, region="eu-west", seconds=20)

            await nodes.call(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port])
            await nodes.call(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
            await phases.write(f"{namespace}:migrating")
            moved = await _migrate_keys(nodes, source.port, target, slot)
            assert names.local_stream.encode() in moved
            await phases.write(f"{namespace}:migrated")  # the gateway meets ASK meanwhile
            for port in [
                target,
                source.port,
                *(p for p in nodes.clients if p not in (target, source.port)),
            ]:
                await nodes.call(port, "CLUSTER", "SETSLOT", slot, "NODE", ids[target])
            await phases.write(f"{namespace}:after")

            async def all_gone() -> bool:
                here = sum([int(await cluster.exists(key)) for key in phases.keys])
                return here == 0 and int(await standalone.exists(*phases.keys)) == 0

            await wait_until(all_gone, seconds=30, interval=0.1, what="every key gone in both")

            async def rerouted() -> bool:
                return metric(east, "invalgw_partition_reroutes_total", **MOVED) >= 1

            await wait_until(rerouted, seconds=10, what="the move counted")
            assert metric(east, "invalgw_partitions_owned", region="us-east") == P
            assert not east.drain.requested
            groups = await nodes.clients[target].xinfo_groups(names.local_stream)
            assert APPLY_GROUP.encode() in [group["name"] for group in groups]  # moved with it
    finally:
        await close(standalone)
        await nodes.aclose()


MOVED = {"region": "us-east", "cause": "moved"}


async def _migrate_keys(nodes: Nodes, source: int, target: int, slot: int) -> list[bytes]:
    """MIGRATE every key of ``slot`` from ``source`` to ``target``; the keys moved."""
    moved: list[bytes] = []
    while keys := await nodes.call(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
        await nodes.call(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        moved += keys
    return moved
