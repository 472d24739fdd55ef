"""Consumer groups lost (Redis restarted without persistence, or the stream deleted): each group
is recreated, logged and counted; the gateway neither crashes nor stalls; the history that was
lost shows up as a gap in the regions that may have missed invalidations."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import redis.asyncio

from invalgw.config import CacheEndpoint
from invalgw.dev.localredis import RedisProcess
from invalgw.lag import status_decoder
from invalgw.names import Names
from invalgw.proto import entry_fields
from invalgw.service import Gateway
from tests.conftest import (
    REGIONS,
    clients,
    make_configs,
    metric,
    running,
    stream_entries,
    wait_gone,
    wait_until,
)
from tests.processes import die_with_parent
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio

STAGES = {
    region: ["apply"]
    + [f"{kind}:{peer}" for peer in REGIONS if peer != region for kind in ("to", "from")]
    for region in REGIONS
}


def urls_of(servers: list[RedisServer]) -> dict[str, str]:
    return {region: server.url for region, server in zip(REGIONS, servers, strict=True)}


async def gaps_from(
    client: redis.asyncio.Redis, names: Names, origin: str
) -> list[dict[bytes, bytes]]:
    return [
        fields
        for _, fields in await stream_entries(client, names.gaps)
        if fields[b"origin"] == origin.encode()
    ]


async def invalidate_everywhere(
    redis_by_region: dict[str, redis.asyncio.Redis], names: Names, tag: str
) -> None:
    """Write one invalidation in each region and wait until all of them are applied everywhere."""
    keys = {region: f"{names.namespace}-key:{tag}:{region}" for region in REGIONS}
    for client in redis_by_region.values():
        await client.mset(dict.fromkeys(keys.values(), "cached"))
    for region, key in keys.items():
        await redis_by_region[region].xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]
    for region, client in redis_by_region.items():
        await wait_gone(client, list(keys.values()), region=region)


def recreated(gateway: Gateway, stage: str) -> float:
    return metric(
        gateway,
        "invalgw_consumer_groups_recreated_total",
        region=gateway.config.region,
        group=stage,
    )


async def test_deleted_stream_recreated_once_and_peers_record_one_gap(
    session_servers: list[RedisServer], namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    configs = make_configs(urls_of(session_servers), namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        east = redis_by_region["us-east"]
        await invalidate_everywhere(redis_by_region, names, "before")
        old_epoch: Any = await east.get(names.epoch)

        await east.delete(names.local_stream)

        async def all_recreated() -> bool:
            return all(
                recreated(gateways["us-east"], stage) == 1
                for stage in ("apply", "to:eu-west", "to:ap-south")
            )

        await wait_until(all_recreated, what="us-east's three groups to be recreated")
        await invalidate_everywhere(redis_by_region, names, "after")
        new_epoch: Any = await east.get(names.epoch)
        assert new_epoch != old_epoch
        for peer in ("eu-west", "ap-south"):
            [gap] = await gaps_from(redis_by_region[peer], names, "us-east")
            assert b"new epoch" in gap[b"reason"]
        assert await gaps_from(east, names, "us-east") == []
        status = status_decoder.decode((await east.hgetall(names.status))[b"us-east"])
        assert status.epoch == new_epoch.decode()
    assert "consumer group 'apply' of stream" in caplog.text
    assert caplog.text.count("stream history was lost") == 1


async def test_redis_restart_without_persistence(
    own_servers: list[RedisServer], namespace: str
) -> None:
    """eu-west's Redis restarts empty under a running gateway: every group comes back, counted,
    and invalidations written afterwards are applied everywhere."""
    configs = make_configs(urls_of(own_servers), namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        await invalidate_everywhere(redis_by_region, names, "before")
        own_servers[1].kill()
        own_servers[1].restart()
        await redis_by_region["eu-west"].connection_pool.disconnect()

        async def all_recreated() -> bool:
            return all(recreated(gateways["eu-west"], stage) >= 1 for stage in STAGES["eu-west"])

        await wait_until(all_recreated, what="every group of eu-west to be recreated")
        await invalidate_everywhere(redis_by_region, names, "after")
        for peer in ("us-east", "ap-south"):
            # the new epoch, once: the trimmer forgot the lost stream, so no second range
            [gap] = await gaps_from(redis_by_region[peer], names, "eu-west")
            assert b"new epoch" in gap[b"reason"]
        for region in ("us-east", "ap-south"):
            assert all(recreated(gateways[region], stage) == 0 for stage in STAGES[region])


async def test_peer_that_lost_undelivered_mirror_entries_records_a_gap(
    own_servers: list[RedisServer], namespace: str
) -> None:
    """Envelopes were delivered to eu-west while its gateway was down, then its Redis restarted
    empty: eu-west can no longer apply them, so it records a gap for us-east."""
    configs = make_configs(urls_of(own_servers), namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    keys = [f"{namespace}:k{i}" for i in range(5)]
    async with clients(configs) as redis_by_region, running(configs, "us-east", "ap-south"):
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        for key in keys:
            await east.xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]

        async def delivered() -> bool:
            link: Any = await east.hget(names.link("eu-west"), "last")
            info = await east.xinfo_stream(names.local_stream)
            return bool(link == info["last-generated-id"])

        await wait_until(delivered, what="us-east to deliver everything to eu-west")
        own_servers[1].kill()
        own_servers[1].restart()
        async with running(configs, "eu-west"):

            async def gap_recorded() -> bool:
                return bool(await gaps_from(west, names, "us-east"))

            await wait_until(gap_recorded, what="eu-west to record a gap for us-east")


async def test_receiver_does_not_count_as_applied_what_it_failed_to_apply(
    own_servers: list[RedisServer], namespace: str
) -> None:
    """eu-west reads envelopes but cannot reach its cache; then its Redis restarts empty and
    the envelopes are gone. They were never applied, so eu-west must record a gap for them."""
    configs = make_configs(urls_of(own_servers), namespace)
    cache = RedisProcess(preexec=die_with_parent)
    west_config = msgspec.structs.replace(
        configs["eu-west"],
        cache=CacheEndpoint(
            url=cache.url, socket_timeout_ms=500, connect_timeout_ms=200, retries=0
        ),
    )
    configs = {**configs, "eu-west": west_config}
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    try:
        async with clients(configs) as redis_by_region, running(configs) as gateways:
            east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
            await east.xadd(names.local_stream, entry_fields([f"{namespace}:k"]))  # type: ignore[arg-type]

            async def failing_to_apply() -> bool:
                errors = metric(
                    gateways["eu-west"],
                    "invalgw_redis_errors_total",
                    region="eu-west",
                    target="eu-west",
                )
                return errors >= 2

            await wait_until(failing_to_apply, what="eu-west to fail to apply")
            own_servers[1].kill()
            own_servers[1].restart()
            cache.start()

            async def gap_recorded() -> bool:
                return bool(await gaps_from(west, names, "us-east"))

            await wait_until(gap_recorded, what="eu-west to record a gap for us-east")
    finally:
        cache.cleanup()
