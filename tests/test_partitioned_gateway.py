"""One gateway process runs every partition of its region's stream, on a Redis Cluster.

us-east's stream Redis (and cache) is a local 3-primary Redis Cluster with its stream split in
P = 4 partitions; eu-west is a standalone Redis with one stream. Invalidations written in either
region, by the partition rule, are applied in both; every key the gateway keeps for a partition
is in the partition's slot, and eu-west receives one mirror stream per partition of us-east.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from invalgw.config import RegionConfig
from invalgw.connections import close
from invalgw.dev.localredis import RedisProcess
from invalgw.names import APPLY_GROUP, Names, forward_group
from invalgw.producer import Invalidator
from invalgw.proto import partition_of
from tests.cluster import cluster_client, partitioned_on_cluster, redis_cluster
from tests.conftest import (
    make_configs,
    metric,
    running,
    wait_gone,
    wait_until,
    write_config,
)
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
    return partitioned_on_cluster(configs, P)


@pytest.fixture
async def cluster(cluster_nodes: list[RedisProcess]) -> AsyncIterator[RedisCluster]:
    client = cluster_client(cluster_nodes[0])
    yield client
    await close(client)


async def test_every_partition_is_applied_and_forwarded_by_one_process(
    two_regions: dict[str, RegionConfig],
    cluster: RedisCluster,
    session_servers: list[RedisServer],
    namespace: str,
) -> None:
    us_east, eu_west = two_regions["us-east"], two_regions["eu-west"]
    standalone = redis.asyncio.Redis.from_url(
        eu_west.redis.url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
    )
    keys = [f"{namespace}:user:{n}" for n in range(24)]
    assert len({partition_of(key, P) for key in keys}) == P
    try:
        async with running(two_regions) as gateways:
            for key in keys:
                await cluster.set(key, "cached")
                await standalone.set(key, "cached")
            producer = Invalidator(cluster, stream=us_east.streams.local, partitions=P)
            for key in keys[:12]:
                await producer.invalidate(key)
            await Invalidator(standalone, stream=eu_west.streams.local).invalidate(*keys[12:])
            await wait_gone(standalone, keys, region="eu-west", seconds=20)
            await wait_until(
                lambda: _none_exist(cluster, keys), seconds=20, what="keys gone in us-east"
            )
            await _partition_state_is_in_its_slot(cluster, standalone, us_east, eu_west)
            east = gateways["us-east"]
            assert metric(east, "invalgw_partitions_owned", region="us-east") == P

            async def nothing_waits() -> bool:
                labels = {"region": "us-east", "group": "to:eu-west"}
                return metric(east, "invalgw_backlog_entries", **labels) == 0

            await wait_until(nothing_waits, seconds=20, what="the backlog summed to 0")
    finally:
        await close(standalone)


async def _none_exist(cluster: RedisCluster, keys: list[str]) -> bool:
    return sum([int(await cluster.exists(key)) for key in keys]) == 0


async def _partition_state_is_in_its_slot(
    cluster: RedisCluster,
    standalone: redis.asyncio.Redis,
    us_east: RegionConfig,
    eu_west: RegionConfig,
) -> None:
    names = Names(us_east.streams.namespace, us_east.streams.local)

    async def state_saved() -> bool:
        for p in range(P):
            part = names.partition(p, P)
            stream_slot = cluster.keyslot(part.local_stream)
            for key in (part.status, part.epoch, part.link("eu-west")):
                if cluster.keyslot(key) != stream_slot or not await cluster.exists(key):
                    return False
            groups = {g["name"].decode() for g in await cluster.xinfo_groups(part.local_stream)}
            if groups != {APPLY_GROUP, forward_group("eu-west")}:
                return False
            if not await standalone.exists(names.mirror("us-east", p)):
                return False
            if not await standalone.exists(names.mirror_status("us-east", p)):
                return False
        return bool(await cluster.exists(names.mirror_status("eu-west")))

    await wait_until(state_saved, seconds=20, what="each partition's state in its slot")


def test_a_clustered_stream_redis_needs_partitions(two_regions: dict[str, RegionConfig]) -> None:
    us_east = two_regions["us-east"]
    raw = {**msgspec.to_builtins(us_east), "streams": {"partitions": 1}}
    with pytest.raises(msgspec.ValidationError, match="needs \\[streams\\] partitions above 1"):
        msgspec.convert(raw, RegionConfig)


async def lag(paths: list[Path], *args: str) -> tuple[int, str]:
    argv = [sys.executable, "-m", "invalgw", "lag", *args]
    for path in paths:
        argv += ["--config", str(path)]
    result = await anyio.run_process(argv, check=False)
    assert result.returncode in (0, 1), result.stderr.decode()
    return result.returncode, result.stdout.decode()


def _pair(rows: list[dict[str, Any]], origin: str, region: str) -> list[dict[str, Any]]:
    return [row for row in rows if (row["origin"], row["region"]) == (origin, region)]


async def test_lag_shows_a_partitioned_region_per_pair_and_per_partition(
    two_regions: dict[str, RegionConfig],
    cluster: RedisCluster,
    namespace: str,
    tmp_path: Path,
) -> None:
    paths = [write_config(tmp_path / f"{name}.toml", c) for name, c in two_regions.items()]
    us_east = two_regions["us-east"]
    keys = [f"{namespace}:lag:{n}" for n in range(24)]
    producer = Invalidator(cluster, stream=us_east.streams.local, partitions=P)
    snapshot: dict[str, Any] = {}
    assert len({partition_of(key, P) for key in keys}) == P
    async with running(two_regions):
        for key in keys:  # an entry each, in its key's partition
            await producer.invalidate(key)

        async def every_row_ok() -> bool:
            code, out = await lag(paths, "--json", "--partitions")
            snapshot.update(json.loads(out))
            rows = snapshot["links"] + snapshot["partitions"]
            applied = sum(row["applied"] or 0 for row in _pair(snapshot["links"], *EAST_WEST))
            return code == 0 and all(row["state"] == "ok" for row in rows) and applied == len(keys)

        await wait_until(every_row_ok, seconds=30, interval=0.3, what="every row ok")
        assert len(snapshot["links"]) == 4
        for origin, region in (("us-east", "us-east"), EAST_WEST):
            (pair,) = _pair(snapshot["links"], origin, region)
            parts = _pair(snapshot["partitions"], origin, region)
            assert [row["partition"] for row in parts] == list(range(P))
            assert pair["applied"] == sum(row["applied"] for row in parts)
            assert pair["backlog"] == 0
            assert all(row["backlog"] == 0 for row in parts)
            owners = {row["owner"] for row in parts}
            assert len(owners) == 1
            assert None not in owners
        assert not _pair(snapshot["partitions"], "eu-west", "us-east")  # eu-west: one stream
        assert await lag(paths, "--check", "--partitions") == (0, "")

    # every gateway stopped: one entry written to one partition waits there, and is shown there
    key = keys[0]
    await producer.invalidate(key)
    code, out = await lag(paths, "--json", "--partitions")
    stopped = json.loads(out)
    (pair,) = _pair(stopped["links"], *EAST_WEST)
    assert pair["backlog"] == 1
    waiting = [
        row["partition"] for row in _pair(stopped["partitions"], *EAST_WEST) if row["backlog"]
    ]
    assert waiting == [partition_of(key, P)]
    code, out = await lag(paths, "--check", "--fail-on", "backlog>0", "--partitions")
    assert code == 1
    assert f"us-east → eu-west partition {partition_of(key, P)}: backlog" in out


EAST_WEST = ("us-east", "eu-west")
