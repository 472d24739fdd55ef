"""Partitions: a peer that stops answering hurts only itself, and catches up by itself.

Three regions on real Redis servers; us-east and eu-west reach ap-south's Redis only through a
:class:`WanProxy` each, so a test can cut ap-south off (blackhole, reset, refuse) and heal it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio

from invalgw.config import RegionConfig
from invalgw.dev.wanproxy import WanProxy
from invalgw.producer import Invalidator
from invalgw.service import Gateway
from tests.conftest import (
    REGIONS,
    clients,
    make_configs,
    proxied,
    running,
    via,
    wait_gone,
    wait_until,
)
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio

PEER_SOCKET_TIMEOUT_S = 1.0  # make_configs: peers' socket_timeout_ms
BACKOFF_CAP_S = 0.2  # make_configs: gateway.retry_backoff_cap_ms


class Link:
    """The proxies between ap-south and the other regions, changed together."""

    def __init__(self, proxies: list[WanProxy]) -> None:
        self.proxies = proxies

    def __getattr__(self, action: str) -> Callable[[], None]:
        def each() -> None:
            for proxy in self.proxies:
                getattr(proxy, action)()

        return each


@asynccontextmanager
async def ap_south_behind_proxies(
    servers: list[RedisServer], namespace: str, **overrides: dict[str, Any]
) -> AsyncIterator[tuple[dict[str, RegionConfig], Link]]:
    urls = {region: server.url for region, server in zip(REGIONS, servers, strict=True)}
    ap_south = urls["ap-south"]
    async with proxied(ap_south) as from_us, proxied(ap_south) as from_eu:
        configs = make_configs(
            urls,
            namespace,
            peer_urls={
                "us-east": {"ap-south": via(from_us, ap_south)},
                "eu-west": {"ap-south": via(from_eu, ap_south)},
            },
            gateway={"trim_interval_ms": 200, **overrides.pop("gateway", {})},
            **overrides,
        )
        yield configs, Link([from_us, from_eu])


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    value = gateway.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def errors_reaching(gateway: Gateway, peer: str) -> float:
    return metric(gateway, "invalgw_redis_errors_total", region=gateway.config.region, target=peer)


def link_up(gateway: Gateway, peer: str) -> float:
    return metric(gateway, "invalgw_link_up", region=gateway.config.region, peer=peer)


def holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def condition() -> bool:
        return check()

    return condition


async def backlog_in_redis(client: redis.asyncio.Redis, stream: str, group: str) -> int:
    """Entries of ``stream`` not yet delivered to ``group``: its pending list plus its lag."""
    for info in await client.xinfo_groups(stream):
        if info["name"].decode() == group:
            return int(info["pending"]) + int(info["lag"] or 0)
    raise AssertionError(f"no group {group} on {stream}")


async def count_existing(client: redis.asyncio.Redis, keys: list[str]) -> int:
    return int(await client.exists(*keys))


async def assert_nothing_lost(
    gateways: dict[str, Gateway], redis_by_region: dict[str, redis.asyncio.Redis], sent: int
) -> None:
    """Every invalidation from us-east was applied once in each peer, and no gap was recorded."""
    for region in ("eu-west", "ap-south"):
        gateway = gateways[region]

        def applied(gateway: Gateway = gateway, region: str = region) -> float:
            labels = {"region": region, "origin": "us-east", "op": "unlink"}
            return metric(gateway, "invalgw_invalidations_applied_total", **labels)

        # counted just after the UNLINK and the acknowledgement: the keys may go a moment earlier
        await wait_until(holds(lambda: applied() >= sent), what=f"{region} to count {sent}")
        assert applied() == sent, f"{region} applied {applied()} of {sent} invalidations"
        assert metric(gateway, "invalgw_gaps_total", region=region, origin="us-east") == 0
        namespace = gateway.config.streams.namespace
        assert await redis_by_region[region].xlen(f"{namespace}:gaps") == 0


async def test_a_blackholed_peer_hurts_only_itself_and_catches_up_after_the_heal(
    session_servers: list[RedisServer], namespace: str
) -> None:
    async with AsyncExitStack() as stack:
        configs, link = await stack.enter_async_context(
            ap_south_behind_proxies(session_servers, namespace)
        )
        redis_by_region = await stack.enter_async_context(clients(configs))
        gateways = await stack.enter_async_context(running(configs))
        us_east, ap_south = gateways["us-east"], gateways["ap-south"]
        stream = configs["us-east"].streams.local
        keys = [f"{namespace}:user:{i}" for i in range(20)]
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        await wait_until(
            holds(lambda: link_up(us_east, "ap-south") == 1), what="the link to work at first"
        )

        link.blackhole()
        blackholed_at = time.monotonic()
        # each call to the silent peer gives up after its socket timeout, not minutes later
        await wait_until(
            holds(lambda: errors_reaching(us_east, "ap-south") >= 1),
            seconds=PEER_SOCKET_TIMEOUT_S + 2,
            what="the forwarder's first call to ap-south to time out",
        )
        assert time.monotonic() - blackholed_at >= PEER_SOCKET_TIMEOUT_S * 0.8
        assert link_up(us_east, "ap-south") == 0
        stuck_errors = errors_reaching(us_east, "ap-south")

        invalidator = Invalidator(redis_by_region["us-east"], stream=stream)
        apply_seconds = []
        for key in keys[:10]:
            start = time.monotonic()
            await invalidator.invalidate(key)
            await wait_gone(redis_by_region["us-east"], [key], region="us-east", seconds=2)
            apply_seconds.append(time.monotonic() - start)
        await invalidator.invalidate(*keys[10:])
        await wait_gone(redis_by_region["us-east"], keys, region="us-east", seconds=1)
        await wait_gone(redis_by_region["eu-west"], keys, region="eu-west", seconds=3)
        # local apply ran at its usual pace while the forwarder to ap-south was timing out
        assert max(apply_seconds) < 1.0, apply_seconds
        await wait_until(
            holds(lambda: errors_reaching(us_east, "ap-south") > stuck_errors),
            seconds=PEER_SOCKET_TIMEOUT_S + 2,
            what="the forwarder to keep trying ap-south",
        )

        assert await backlog_in_redis(redis_by_region["us-east"], stream, "to:ap-south") == 11
        assert await backlog_in_redis(redis_by_region["us-east"], stream, "to:eu-west") == 0
        await wait_until(
            holds(
                lambda: (
                    metric(
                        us_east, "invalgw_backlog_entries", region="us-east", group="to:ap-south"
                    )
                    == 11
                )
            ),
            what="the backlog metric to show ap-south's 11 entries",
        )
        await wait_until(
            holds(lambda: heartbeat_age(ap_south, "us-east") >= 1.0),
            seconds=3,
            what="ap-south to see that us-east went silent",
        )
        assert await count_existing(redis_by_region["ap-south"], keys) == len(keys)

        link.heal()
        await wait_gone(redis_by_region["ap-south"], keys, region="ap-south", seconds=5)
        await wait_until(
            holds(lambda: link_up(us_east, "ap-south") == 1), what="the link to be up again"
        )
        await wait_until(
            holds(lambda: heartbeat_age(ap_south, "us-east") < 1.0),
            seconds=3,
            what="us-east's heartbeats to reach ap-south again",
        )
        assert await backlog_in_redis(redis_by_region["us-east"], stream, "to:ap-south") == 0
        await assert_nothing_lost(gateways, redis_by_region, sent=11)


def heartbeat_age(gateway: Gateway, origin: str) -> float:
    region = gateway.config.region
    labels = {"region": region, "origin": origin}
    value = gateway.metrics.registry.get_sample_value("invalgw_heartbeat_age_seconds", labels)
    return float("inf") if value is None else value


async def test_a_refusing_peer_is_retried_with_capped_backoff_not_a_hot_loop(
    session_servers: list[RedisServer], namespace: str
) -> None:
    async with AsyncExitStack() as stack:
        configs, link = await stack.enter_async_context(
            ap_south_behind_proxies(session_servers, namespace)
        )
        redis_by_region = await stack.enter_async_context(clients(configs))
        gateways = await stack.enter_async_context(running(configs))
        us_east = gateways["us-east"]
        keys = [f"{namespace}:user:{i}" for i in range(10)]
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        await wait_until(
            holds(lambda: link_up(us_east, "ap-south") == 1), what="the link to work at first"
        )

        link.refuse()
        link.reset_connections()
        invalidator = Invalidator(
            redis_by_region["us-east"], stream=configs["us-east"].streams.local
        )
        start = time.monotonic()
        for key in keys:
            await invalidator.invalidate(key)
        await wait_gone(redis_by_region["us-east"], keys, region="us-east", seconds=1)
        assert time.monotonic() - start < 1.0
        await wait_gone(redis_by_region["eu-west"], keys, region="eu-west", seconds=3)

        # every attempt fails at once now: only the backoff keeps the forwarder from spinning
        before, since = errors_reaching(us_east, "ap-south"), time.monotonic()
        await wait_until(
            holds(lambda: errors_reaching(us_east, "ap-south") >= before + 10),
            seconds=10 * BACKOFF_CAP_S + 3,
            what="ten more failed attempts (the backoff is capped)",
        )
        # full jitter below a 200 ms cap: ~10 attempts a second; a hot loop would do thousands
        assert time.monotonic() - since >= 0.4
        assert await count_existing(redis_by_region["ap-south"], keys) == len(keys)

        link.heal()
        await wait_gone(redis_by_region["ap-south"], keys, region="ap-south", seconds=5)
        await assert_nothing_lost(gateways, redis_by_region, sent=len(keys))


async def test_a_flapping_link_loses_nothing_and_applies_nothing_twice(
    session_servers: list[RedisServer], namespace: str
) -> None:
    async with AsyncExitStack() as stack:
        configs, link = await stack.enter_async_context(
            ap_south_behind_proxies(session_servers, namespace)
        )
        redis_by_region = await stack.enter_async_context(clients(configs))
        gateways = await stack.enter_async_context(running(configs))
        keys = [f"{namespace}:user:{i}" for i in range(300)]
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        invalidator = Invalidator(
            redis_by_region["us-east"], stream=configs["us-east"].streams.local
        )

        resets = 0

        async def flap() -> None:
            nonlocal resets
            while True:
                resets += sum(proxy.reset_connections() for proxy in link.proxies)
                await anyio.sleep(0.03)

        async with anyio.create_task_group() as tg:
            tg.start_soon(flap)
            for start in range(0, len(keys), 3):
                await invalidator.invalidate(*keys[start : start + 3])
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        assert resets >= 10

        for region, client in redis_by_region.items():
            await wait_gone(client, keys, region=region, seconds=5)
        await assert_nothing_lost(gateways, redis_by_region, sent=len(keys) // 3)


def with_peer(config: RegionConfig, name: str, **changes: Any) -> RegionConfig:
    peers = [msgspec.structs.replace(p, **changes) if p.name == name else p for p in config.peers]
    return msgspec.structs.replace(config, peers=peers)


async def test_a_silent_peer_does_not_hold_up_clock_samples_of_the_others(
    session_servers: list[RedisServer], namespace: str
) -> None:
    urls = {region: server.url for region, server in zip(REGIONS, session_servers, strict=True)}
    first_the_silent_one = {region: urls[region] for region in ("ap-south", "us-east", "eu-west")}
    async with proxied(urls["ap-south"]) as proxy:
        proxy.blackhole()
        configs = make_configs(
            first_the_silent_one,
            namespace,
            peer_urls={"us-east": {"ap-south": via(proxy, urls["ap-south"])}},
        )
        us_east = with_peer(configs["us-east"], "ap-south", socket_timeout_ms=3000)
        assert [peer.name for peer in us_east.peers] == ["ap-south", "eu-west"]
        async with running({"us-east": us_east}) as gateways:
            gateway = gateways["us-east"]

            def sampled(peer: str) -> bool:
                labels = {"region": "us-east", "peer": peer}
                offset = gateway.metrics.registry.get_sample_value(
                    "invalgw_clock_offset_seconds", labels
                )
                return offset is not None

            # eu-west's clock is sampled at once, while ap-south's first TIME waits for 3 s
            await wait_until(holds(lambda: sampled("eu-west")), seconds=1.5, what="eu-west's clock")
            assert not sampled("ap-south")


async def test_a_drain_gives_up_on_a_silent_peer_and_its_entries_are_sent_after_a_restart(
    session_servers: list[RedisServer], namespace: str
) -> None:
    async with (
        ap_south_behind_proxies(
            session_servers, namespace, gateway={"heartbeat_interval_ms": 60_000}
        ) as (configs, link),
        clients(configs) as redis_by_region,
    ):
        stream = configs["us-east"].streams.local
        key = f"{namespace}:user:1"
        for client in redis_by_region.values():
            await client.set(key, "cached")
        us_east = with_peer(configs["us-east"], "ap-south", socket_timeout_ms=4000)
        async with running({"us-east": us_east}) as gateways:
            await wait_until(
                holds(lambda: link_up(gateways["us-east"], "ap-south") == 1),
                what="the link to work at first",
            )
            link.blackhole()
            await Invalidator(redis_by_region["us-east"], stream=stream).invalidate(key)

            def sent_to_ap_south() -> bool:
                labels = {"region": "us-east", "peer": "ap-south"}
                return metric(gateways["us-east"], "invalgw_batches_in_flight", **labels) == 1

            await wait_until(
                holds(sent_to_ap_south), what="the forwarder to call the silent ap-south"
            )
            drain_started = time.monotonic()
        # not the 4 s the call would take to time out: a short grace, then the call is dropped
        assert time.monotonic() - drain_started < 2.5
        assert await backlog_in_redis(redis_by_region["us-east"], stream, "to:ap-south") == 1

        link.heal()
        async with running(configs) as gateways:
            await wait_gone(redis_by_region["ap-south"], [key], region="ap-south")
            await wait_until(
                lambda: _no_backlog(redis_by_region["us-east"], stream, "to:ap-south"),
                what="the restarted forwarder to deliver the entry",
            )
            await assert_nothing_lost(gateways, redis_by_region, sent=1)


async def _no_backlog(client: redis.asyncio.Redis, stream: str, group: str) -> bool:
    return await backlog_in_redis(client, stream, group) == 0
