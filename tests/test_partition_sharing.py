"""Gateway processes of one region share its partitions by lease, on a real Redis Cluster.

us-east: stream Redis (and cache) a local 3-primary cluster, P = 8, three gateway processes;
eu-west: one standalone Redis and gateway receiving the eight mirror streams. Under writes of
increasing versions: SIGKILL one us-east process (its partitions move within the lease time),
add a fourth (the leases rebalance), drain one (its partitions move at once). At the end every
invalidation reached eu-west, each key's versions in order, and no gap was recorded.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import msgspec
import pytest
import redis

from invalgw.config import RegionConfig
from invalgw.connections import connect_sync_any
from invalgw.dev.localredis import RedisProcess
from invalgw.names import Names
from invalgw.producer import SyncInvalidator
from invalgw.proto import Batch, decode_envelope
from invalgw.proto.envelope import ENVELOPE_FIELD
from tests.cluster import partitioned_on_cluster, redis_cluster
from tests.conftest import make_configs
from tests.processes import GatewayProcess, Processes, all_gone, sync_client, wait_for
from tests.servers import RedisServer

P = 8
LEASE_MS = 2000
KEYS = 40


@pytest.fixture(scope="module")
def cluster_nodes() -> Iterator[list[RedisProcess]]:
    with redis_cluster(3) as nodes:
        yield nodes


def region_configs(
    cluster_nodes: list[RedisProcess], server: RedisServer, namespace: str
) -> dict[str, RegionConfig]:
    cluster_url = f"redis://127.0.0.1:{cluster_nodes[0].port}/0"
    configs = make_configs({"us-east": cluster_url, "eu-west": server.url}, namespace)
    return partitioned_on_cluster(configs, P, lease_ms=LEASE_MS)


def owners(cluster: redis.RedisCluster, config: RegionConfig) -> dict[int, str]:
    """Partition → consumer name of its lease holder (partitions without one left out)."""
    names = Names(config.streams.namespace, config.streams.local)
    found = {}
    for p in range(P):
        value = cluster.get(names.partition(p, P).lease)
        if isinstance(value, bytes):
            found[p] = value.decode().split()[0]
    return found


def balanced(cluster: redis.RedisCluster, config: RegionConfig, members: set[str]) -> bool:
    held = owners(cluster, config)
    counts = Counter(held.values())
    return (
        len(held) == P
        and set(counts) == members
        and max(counts.values()) - min(counts.values()) <= 1
    )


def start(processes: Processes, config: RegionConfig, consumer: str) -> GatewayProcess:
    tuning = msgspec.structs.replace(config.gateway, consumer=consumer)
    own = msgspec.structs.replace(config, gateway=tuning)
    return processes.add(consumer, own).start()


def write(producer: SyncInvalidator, keys: list[str], versions: range) -> None:
    for version in versions:
        for key in keys:
            producer.invalidate(key, version=version)


def delivered_in_order(
    eu_west: redis.Redis, config: RegionConfig, keys: list[str], last: int
) -> bool:
    """Each key's last version reached eu-west's mirror streams, and, re-sent envelopes aside
    (events not above the origin IDs already seen), its versions came in increasing order
    (some skipped: a batch carries only the last invalidation of a key, see conflate.py)."""
    names = Names(config.streams.namespace, config.streams.local)
    seen: dict[str, list[int]] = {}
    for p in range(P):
        top = (0, 0)
        entries: list[tuple[bytes, dict[bytes, bytes]]] = eu_west.xrange(  # type: ignore[assignment]
            names.mirror("us-east", p)
        )
        for _id, fields in entries:
            envelope = decode_envelope(fields[ENVELOPE_FIELD])
            if not isinstance(envelope, Batch):
                continue
            for event in envelope.events:
                ms, seq = (int(x) for x in event.id.split("-"))
                if (ms, seq) <= top:
                    continue  # re-sent after a move: already counted
                top = (ms, seq)
                for key in event.keys:
                    seen.setdefault(key, []).append(int(event.version or 0))
    for key in keys:
        versions = seen.get(key, [])
        assert versions == sorted(set(versions)), f"{key}: out of order {versions}"
    return all(seen.get(key, [])[-1:] == [last] for key in keys)


def test_processes_share_partitions_and_survive_kill_join_and_drain(
    cluster_nodes: list[RedisProcess],
    session_servers: list[RedisServer],
    namespace: str,
    processes: Processes,
) -> None:
    configs = region_configs(cluster_nodes, session_servers[1], namespace)
    us_east, eu_west_config = configs["us-east"], configs["eu-west"]
    cluster = connect_sync_any(us_east.redis, name="test")
    assert isinstance(cluster, redis.RedisCluster)
    eu_west = sync_client(eu_west_config)
    keys = [f"{namespace}:user:{n}" for n in range(KEYS)]
    producer = SyncInvalidator(cluster, stream=us_east.streams.local, partitions=P)
    names = Names(us_east.streams.namespace, us_east.streams.local)
    for p in range(P):  # keeps what arrives in eu-west (its trimming waits for every group)
        eu_west.xgroup_create(names.mirror("us-east", p), "audit", id="0", mkstream=True)
    try:
        processes.add("eu-west", eu_west_config).start().wait_ready()
        gateways = {name: start(processes, us_east, name) for name in ("gw-a", "gw-b", "gw-c")}
        for gateway in gateways.values():
            gateway.wait_ready()
        wait_for(lambda: balanced(cluster, us_east, {"gw-a", "gw-b", "gw-c"}), what="3 share 8")
        write(producer, keys, range(1, 4))

        victim = {p for p, owner in owners(cluster, us_east).items() if owner == "gw-b"}
        gateways["gw-b"].kill()
        killed = time.monotonic()
        write(producer, keys, range(4, 7))  # while its partitions wait for their leases
        wait_for(
            lambda: balanced(cluster, us_east, {"gw-a", "gw-c"}),
            seconds=LEASE_MS / 1000 * 3,
            what="the killed process's partitions to move",
        )
        moved_s = time.monotonic() - killed
        assert moved_s < LEASE_MS / 1000 * 2, f"{sorted(victim)} moved after {moved_s:.1f}s"

        gateways["gw-d"] = start(processes, us_east, "gw-d").wait_ready()
        write(producer, keys, range(7, 10))
        wait_for(
            lambda: balanced(cluster, us_east, {"gw-a", "gw-c", "gw-d"}),
            seconds=10,
            what="a rebalance over the fourth process",
        )

        gateways["gw-a"].send(15)  # SIGTERM: drain
        drained = time.monotonic()
        wait_for(
            lambda: balanced(cluster, us_east, {"gw-c", "gw-d"}),
            seconds=LEASE_MS / 1000 * 3,
            what="the drained process's partitions to move",
        )
        handed_s = time.monotonic() - drained
        assert handed_s < LEASE_MS / 1000, f"drained partitions moved after {handed_s:.1f}s"
        assert gateways["gw-a"].wait() == 0
        print(f"partitions moved {moved_s:.2f} s after SIGKILL, {handed_s:.2f} s after SIGTERM")
        for key in keys:  # cached again in both regions: the last writes must remove them
            cluster.set(key, "cached")
            eu_west.set(key, "cached")
        write(producer, keys, range(10, 13))
        wait_for(lambda: all_gone(eu_west, keys), seconds=30, what="keys gone in eu-west")
        wait_for(
            lambda: sum(int(cluster.exists(key)) for key in keys) == 0,
            seconds=30,
            what="keys gone in us-east",
        )

        wait_for(
            lambda: delivered_in_order(eu_west, us_east, keys, 12),
            seconds=30,
            what="every invalidation in eu-west, in order",
        )
        assert eu_west.xlen(names.gaps) == 0  # one namespace for both regions
    finally:
        cluster.close()
        eu_west.close()
