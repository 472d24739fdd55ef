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

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from invalgw.config import RegionConfig
from invalgw.connections import close
from invalgw.dev.localredis import RedisProcess
from invalgw.names import APPLY_GROUP, Names
from invalgw.producer import Invalidator
from invalgw.proto import partition_of
from invalgw.topology import redirect_kind
from tests.cluster import cluster_client, partitioned_on_cluster, redis_cluster, replica_of
from tests.conftest import make_configs, metric, running, wait_until
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
    return _two_regions(cluster_nodes[0], session_servers[1], namespace)


def _two_regions(
    entry: RedisProcess, standalone: RedisServer, namespace: str
) -> dict[str, RegionConfig]:
    """us-east on the cluster entered at ``entry``, in P partitions; eu-west on ``standalone``."""
    cluster_url = f"redis://127.0.0.1:{entry.port}/0"
    configs = make_configs({"us-east": cluster_url, "eu-west": standalone.url}, namespace)
    return partitioned_on_cluster(configs, P)


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
        return await self.clients[port].execute_command(*args)  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        for client in self.clients.values():
            await close(client)


class Phases:
    """Invalidations of fresh cached keys, in both regions, one phase at a time: in us-east a
    few in every partition."""

    def __init__(
        self, cluster: RedisCluster, standalone: redis.asyncio.Redis, configs: dict[str, Any]
    ) -> None:
        self.cluster, self.standalone = cluster, standalone
        east, west = configs["us-east"].streams.local, configs["eu-west"].streams.local
        self.east = Invalidator(cluster, stream=east, partitions=P)
        self.west = Invalidator(standalone, stream=west)
        self.keys: list[str] = []

    async def write(self, prefix: str, count: int = 16) -> None:
        east = [f"{prefix}:e:{n}" for n in range(count)]
        west = [f"{prefix}:w:{n}" for n in range(count // 2)]
        assert len({partition_of(key, P) for key in east}) == P
        for key in east + west:
            await _retried(partial(self.cluster.set, key, "cached"))
            await self.standalone.set(key, "cached")
        for key in east:
            await _retried(partial(self.east.invalidate, key))
        await self.west.invalidate(*west)
        self.keys += east + west

    async def keep_writing(self, prefix: str, done: anyio.Event) -> None:
        """One us-east invalidation after another (paced, at most 400) until ``done``."""
        for n in range(400):
            if done.is_set():
                return
            key = f"{prefix}:{n}"
            await self.standalone.set(key, "cached")
            await _retried(partial(self.cluster.set, key, "cached"))
            await _retried(partial(self.east.invalidate, key))
            self.keys.append(key)
            await anyio.sleep(0.005)

    async def all_gone(self) -> bool:
        here = sum([int(await self.cluster.exists(key)) for key in self.keys])
        return here == 0 and int(await self.standalone.exists(*self.keys)) == 0


async def _retried(call: Callable[[], Awaitable[object]]) -> None:
    """``call``, tried again as a producer must during a migration: redis-py's asyncio cluster
    client sends ASKING as a command of its own, on any free connection of the node, so with
    several commands in flight the redirected command may run without it, be sent back with
    MOVED, and bounce until the client gives up ("TTL exhausted"). And on MOVED it re-reads the
    slot map closing every connection of the client (redis-py 8.0), so a command in flight on
    another task fails with "Connection lost" (written or not: an invalidation sent twice is
    harmless)."""
    with anyio.fail_after(10):
        while True:
            try:
                await call()
                return
            except (redis.exceptions.ClusterError, redis.exceptions.ConnectionError):
                await anyio.sleep(0.01)


MOVED = {"cause": "moved"}


@pytest.mark.parametrize("moving", ["partition", "mirror"])
async def test_a_slot_that_moves_is_followed_without_a_restart(
    two_regions: dict[str, RegionConfig],
    cluster: RedisCluster,
    cluster_nodes: list[RedisProcess],
    namespace: str,
    moving: str,
) -> None:
    """``partition``: partition 0 of us-east's stream (with every key of that partition);
    ``mirror``: eu-west's mirror stream in us-east's cluster, which eu-west's sender (an
    unpartitioned region) writes and a partition of us-east applies."""
    us_east, eu_west = two_regions["us-east"], two_regions["eu-west"]
    names = Names(us_east.streams.namespace, us_east.streams.local)
    key = names.partition(0, P).local_stream if moving == "partition" else names.mirror("eu-west")
    await cluster.initialize()
    slot = cluster.keyslot(key)
    node = cluster.get_node_from_key(key)
    assert node is not None
    source = int(node.port)
    target = next(each.port for each in cluster_nodes if each.port != source)
    nodes = Nodes(cluster_nodes)
    standalone = redis.asyncio.Redis.from_url(
        eu_west.redis.url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
    )
    phases = Phases(cluster, standalone, two_regions)
    ids = {port: (await nodes.call(port, "CLUSTER", "MYID")).decode() for port in nodes.clients}
    try:
        async with running(two_regions) as gateways:
            east, west = gateways["us-east"], gateways["eu-west"]
            assert metric(east, REROUTES, region="us-east", **MOVED) == 0  # exported at start
            await phases.write(f"{namespace}:before")
            await wait_until(phases.all_gone, seconds=20, what="the first keys gone in both")

            async with anyio.create_task_group() as producing:
                done = anyio.Event()
                producing.start_soon(phases.keep_writing, f"{namespace}:meanwhile", done)
                await nodes.call(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
                await nodes.call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
                await phases.write(f"{namespace}:migrating")
                moved = await _migrate_keys(nodes, source, target, slot)
                assert key.encode() in moved
                await phases.write(f"{namespace}:migrated")  # the gateways meet ASK meanwhile
                others = [port for port in nodes.clients if port not in (target, source)]
                for port in [target, source, *others]:
                    await nodes.call(port, "CLUSTER", "SETSLOT", slot, "NODE", ids[target])
                await phases.write(f"{namespace}:after")
                done.set()

            await wait_until(phases.all_gone, seconds=30, interval=0.1, what="every key gone")

            async def rerouted() -> bool:
                counted = metric(east, REROUTES, region="us-east", **MOVED) >= 1
                if moving == "mirror":  # the sender of eu-west, and the partition applying it
                    counted = counted and metric(west, REROUTES, region="eu-west", **MOVED) >= 1
                return counted

            await wait_until(rerouted, seconds=10, what="the move counted")

            async def all_owned() -> bool:
                return metric(east, "invalgw_partitions_owned", region="us-east") == P

            await wait_until(all_owned, seconds=5, what="every partition owned")
            assert not east.drain.requested
            assert not west.drain.requested
            if moving == "partition":  # its consumer groups moved with it
                groups = await nodes.clients[target].xinfo_groups(key)
                assert APPLY_GROUP.encode() in [group["name"] for group in groups]
    finally:
        await close(standalone)
        await nodes.aclose()


REROUTES = "invalgw_partition_reroutes_total"


async def _migrate_keys(nodes: Nodes, source: int, target: int, slot: int) -> list[bytes]:
    """MIGRATE every key of ``slot`` from ``source`` to ``target``; the keys moved."""
    moved: list[bytes] = []
    while keys := await nodes.call(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
        await nodes.call(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        moved += keys
    return moved


async def test_a_failover_is_followed_without_a_restart(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """The primary serving partition 0 is killed; its replica takes over its slots. The
    gateways find the partitions (and mirror streams) it served on the promoted replica, once
    the old primary has stayed unreachable for a while: nothing written before the crash (and
    replicated) or after the failover is left unapplied."""
    with redis_cluster(3) as nodes:
        victim_port = await _node_serving(nodes, f"{{{namespace}-gw:inval:0}}")
        victim = next(node for node in nodes if node.port == victim_port)
        survivor = next(node for node in nodes if node is not victim)
        with replica_of(victim) as replica:
            configs = _two_regions(survivor, session_servers[1], namespace)
            await _fail_over(configs, victim, replica, survivor, namespace)


async def _fail_over(
    configs: dict[str, RegionConfig],
    victim: RedisProcess,
    replica: RedisProcess,
    survivor: RedisProcess,
    namespace: str,
) -> None:
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    assert names.partition(0, P).local_stream == f"{{{namespace}-gw:inval:0}}"
    admin = Nodes([victim, replica, survivor])
    standalone = redis.asyncio.Redis.from_url(
        configs["eu-west"].redis.url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
    )
    cluster = cluster_client(survivor)
    try:
        async with running(configs) as gateways:
            east = gateways["us-east"]
            phases = Phases(cluster, standalone, configs)
            await phases.write(f"{namespace}:before")
            await wait_until(phases.all_gone, seconds=20, what="the first keys gone in both")
            await _replicated(admin, victim.port, replica.port)
            victim.kill()

            async def promoted() -> bool:  # as the survivor the producer enters at sees it
                state = await admin.call(survivor.port, "CLUSTER", "INFO")
                try:
                    serving = await _node_serving([survivor], names.partition(0, P).local_stream)
                except redis.ConnectionError:  # it still sent a command to the dead node
                    return False
                return b"cluster_state:ok" in state and serving == replica.port

            await wait_until(promoted, seconds=30, interval=0.1, what="the replica promoted")
            await close(cluster)
            phases.cluster = cluster = cluster_client(survivor)  # a client that never saw it
            phases.east = Invalidator(cluster, stream=names.local_stream, partitions=P)
            await phases.write(f"{namespace}:after")
            await wait_until(phases.all_gone, seconds=30, interval=0.1, what="every key gone")

            async def rerouted() -> bool:
                counted = metric(east, REROUTES, region="us-east", cause="unreachable")
                return counted >= 1

            await wait_until(rerouted, seconds=10, what="the failover counted")

            async def all_owned() -> bool:  # those stopped while the cluster was down, too
                return metric(east, "invalgw_partitions_owned", region="us-east") == P

            await wait_until(all_owned, seconds=10, what="every partition run again")
            assert not east.drain.requested
    finally:
        await close(cluster)
        await close(standalone)
        await admin.aclose()


async def _node_serving(nodes: list[RedisProcess], key: str) -> int:
    client = cluster_client(nodes[0])
    try:
        await client.initialize()
        node = client.get_node_from_key(key)
        assert node is not None
        return int(node.port)
    finally:
        await close(client)


async def _replicated(admin: Nodes, primary: int, replica: int) -> None:
    """Wait until ``replica`` has everything ``primary`` had written when this was called."""
    info = await admin.clients[primary].info("replication")
    written = int(info["master_repl_offset"])

    async def caught_up() -> bool:
        seen = await admin.clients[replica].info("replication")
        return int(seen["slave_repl_offset"]) >= written

    await wait_until(caught_up, seconds=10, what="the replica in sync")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (redis.exceptions.MovedError("3999 127.0.0.1:7001"), "moved"),
        (redis.ResponseError("MOVED 3999 127.0.0.1:7001"), "moved"),
        (redis.exceptions.AskError("3999 127.0.0.1:7001"), "ask"),
        (redis.exceptions.TryAgainError("Multiple keys request during rehashing"), "ask"),
        (redis.ConnectionError("Connection refused"), "unreachable"),
        (redis.exceptions.ClusterDownError("The cluster is down"), "unreachable"),
        (redis.ResponseError("WRONGTYPE Operation against a key"), None),
    ],
)
def test_what_a_stage_error_says_about_the_cluster(error: Exception, kind: str | None) -> None:
    assert redirect_kind(error) == kind
