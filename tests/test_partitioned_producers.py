"""Producers on a partitioned stream in a Redis Cluster: each invalidation lands in the partition
of its first key (or pattern), so every key's invalidations stay in one stream, in order."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from invalgw import cli
from invalgw.config import RegionConfig
from invalgw.connections import close, connect_sync_any
from invalgw.dev.localredis import RedisProcess
from invalgw.producer import Invalidator, SyncInvalidator
from invalgw.proto import Limits, parse_entry, partition_of, partition_stream, pattern_partition
from tests.cluster import cluster_client, redis_cluster
from tests.conftest import write_config

pytestmark = pytest.mark.anyio

P = 8


@pytest.fixture(scope="module")
def cluster_nodes() -> Iterator[list[RedisProcess]]:
    with redis_cluster(3) as nodes:
        yield nodes


@pytest.fixture
async def cluster(cluster_nodes: list[RedisProcess]) -> AsyncIterator[RedisCluster]:
    client = cluster_client(cluster_nodes[0])
    yield client
    await close(client)


def partitioned(config: RegionConfig, url: str) -> RegionConfig:
    streams = msgspec.structs.replace(config.streams, partitions=P)
    endpoint = msgspec.structs.replace(config.redis, url=url, cluster=True)
    return msgspec.structs.replace(config, redis=endpoint, streams=streams)


Entries = list[tuple[bytes, dict[bytes, bytes]]]


async def xrange(cluster: RedisCluster, stream: str) -> Entries:
    entries: Any = await cluster.xrange(stream)
    return [(entry_id, dict(fields)) for entry_id, fields in entries]


def ids(client: redis.Redis | redis.RedisCluster, stream: str) -> list[str]:
    entries: Any = client.xrange(stream)
    return [entry_id.decode() for entry_id, _fields in entries]


async def versions_by_stream(cluster: RedisCluster, stream: str) -> dict[str, dict[str, list[int]]]:
    """Per partition stream, per key, the versions in stream order."""
    found: dict[str, dict[str, list[int]]] = {}
    for p in range(P):
        name = partition_stream(stream, p, P)
        for entry_id, fields in await xrange(cluster, name):
            event = parse_entry(entry_id.decode(), fields, Limits())
            for key in event.keys:
                found.setdefault(name, {}).setdefault(key, []).append(int(event.version or 0))
    return found


async def test_each_key_goes_to_its_partition_in_order(
    cluster: RedisCluster, namespace: str
) -> None:
    stream = f"{namespace}:inval"
    invalidator = Invalidator(cluster, stream=stream, partitions=P)
    keys = [f"{namespace}:user:{n}" for n in range(40)] + [f"{{{namespace}:u}}:a"]
    for version in range(1, 6):
        for key in keys:
            await invalidator.invalidate(key, version=version)
    found = await versions_by_stream(cluster, stream)
    assert len(found) == P, "40 keys spread over every partition"
    for key in keys:
        holders = [name for name, per_key in found.items() if key in per_key]
        assert holders == [partition_stream(stream, partition_of(key, P), P)]
        assert found[holders[0]][key] == [1, 2, 3, 4, 5]
    slots = {cluster.keyslot(partition_stream(stream, p, P)) for p in range(P)}
    owners = {cluster.get_node_from_key(partition_stream(stream, p, P)) for p in range(P)}
    assert len(slots) == P
    assert len(owners) > 1, "the partitions spread over the cluster's primaries"


async def test_a_pattern_and_the_keys_of_its_tag_share_a_partition(
    cluster: RedisCluster, namespace: str
) -> None:
    stream = f"{namespace}:inval"
    invalidator = Invalidator(cluster, stream=stream, partitions=P)
    await invalidator.invalidate(f"{{{namespace}:u1}}:profile", version=1)
    await invalidator.invalidate(op="expire", pattern=f"{{{namespace}:u1}}:*")
    p = pattern_partition(f"{{{namespace}:u1}}:*", P)
    assert p == partition_of(f"{{{namespace}:u1}}:profile", P)
    entries = await xrange(cluster, partition_stream(stream, p, P))
    assert [fields.get(b"pattern") for _id, fields in entries] == [
        None,
        f"{{{namespace}:u1}}:*".encode(),
    ]


async def test_unlink_local_on_a_cluster_removes_the_keys_and_writes_the_entry(
    cluster: RedisCluster, namespace: str
) -> None:
    stream = f"{namespace}:inval"
    keys = [f"{namespace}:a", f"{namespace}:b", f"{namespace}:c"]
    for key in keys:
        await cluster.set(key, "cached")
    entry_id = await Invalidator(cluster, stream=stream, partitions=P).invalidate(
        *keys, unlink_local=True
    )
    assert sum([await cluster.exists(key) for key in keys]) == 0
    entries = await xrange(cluster, partition_stream(stream, partition_of(keys[0], P), P))
    assert [e[0].decode() for e in entries] == [entry_id]


def test_publish_and_the_sync_helper_follow_the_rule_on_a_cluster(
    configs: dict[str, RegionConfig],
    cluster_nodes: list[RedisProcess],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = partitioned(configs["us-east"], f"redis://127.0.0.1:{cluster_nodes[1].port}/0")
    path = write_config(tmp_path / "us-east.toml", config)
    key = "{user:1001}:profile"
    assert cli.main(["publish", "--config", str(path), "--version", "7", key]) == 0
    entry_id = capsys.readouterr().out.strip()
    client = connect_sync_any(config.redis, name="test")
    assert isinstance(client, redis.RedisCluster)
    try:
        stream = partition_stream(config.streams.local, partition_of(key, P), P)
        assert ids(client, stream) == [entry_id]
        helper = SyncInvalidator(client, stream=config.streams.local, partitions=P)
        second = helper.invalidate("{user:1001}:cart", version=8)
        assert ids(client, stream) == [entry_id, second]
    finally:
        client.close()


def test_partition_counts_out_of_range_are_refused_by_the_helpers() -> None:
    client = redis.Redis(socket_timeout=1, socket_connect_timeout=1)
    with pytest.raises(ValueError, match="between 1 and 1024"):
        SyncInvalidator(client, partitions=0)
    client.close()


def test_check_names_streams_of_another_layout_that_hold_entries(
    configs: dict[str, RegionConfig],
    cluster_nodes: list[RedisProcess],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """P = 8 on the cluster: fine while nothing waits elsewhere; entries written for P = 16 and
    never applied fail the check, naming the stream; a config saying the cluster is not one too."""
    config = partitioned(configs["us-east"], f"redis://127.0.0.1:{cluster_nodes[0].port}/0")
    config = msgspec.structs.replace(config, peers=[])
    path = write_config(tmp_path / "us-east.toml", config)
    assert cli.main(["check", "--config", str(path)]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1].startswith("ok    us-east (streams): 8 partitions")
    )

    client = connect_sync_any(config.redis, name="test")
    old = partition_stream(config.streams.local, 9, 16)  # not one of P = 8's names
    try:
        client.xadd(old, {"keys": "a"})
        client.xgroup_create(old, "apply", id="0")
        assert cli.main(["check", "--config", str(path)]) == 1
        line = capsys.readouterr().out.splitlines()[-1]
        assert line.startswith(f"FAIL  us-east (streams): streams.partitions: stream '{old}'")
        assert "group apply: 0 pending, 1 unread" in line
        client.xreadgroup("apply", "c", {old: ">"})
        client.xack(old, "apply", *ids(client, old))
        assert cli.main(["check", "--config", str(path)]) == 0  # drained: the change is safe
        capsys.readouterr()
    finally:
        client.close()

    standalone = msgspec.structs.replace(
        config, redis=msgspec.structs.replace(config.redis, cluster=False)
    )
    path = write_config(tmp_path / "us-east.toml", standalone)
    assert cli.main(["check", "--config", str(path)]) == 1
    assert "redis.cluster: the stream Redis is a Redis Cluster; set cluster = True" in (
        capsys.readouterr().out
    )
