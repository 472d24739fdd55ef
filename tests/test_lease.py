"""One gateway of a region runs its stages at a time; a second one waits as a standby."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from invalgw.config import RegionConfig
from invalgw.metrics import Metrics
from invalgw.names import Names
from invalgw.producer import Invalidator
from invalgw.service import Gateway
from tests.conftest import clients, metric, running, wait_gone, wait_until

pytestmark = pytest.mark.anyio


def as_consumer(config: RegionConfig, consumer: str) -> RegionConfig:
    return msgspec.structs.replace(
        config, gateway=msgspec.structs.replace(config.gateway, consumer=consumer)
    )


async def test_a_standby_waits_then_takes_over_when_the_holder_drains(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    """A rolling update: the new gateway of us-east waits while the old one runs, and takes
    over the moment the old one drains; nothing written meanwhile is lost."""
    east = configs["us-east"]
    standby = Gateway(as_consumer(east, "host-b"), metrics=Metrics("us-east"))
    stream = east.streams.local
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        old = gateways["us-east"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(standby.run)

            async def standby_waiting() -> bool:
                held = standby.metrics.registry.get_sample_value(
                    "invalgw_lease_held", {"region": "us-east"}
                )
                return held == 0.0

            await wait_until(standby_waiting, what="the second gateway to wait as a standby")
            assert metric(old, "invalgw_lease_held", region="us-east") == 1.0

            first = [f"{namespace}:before:{i}" for i in range(20)]
            second = [f"{namespace}:after:{i}" for i in range(20)]
            for client in redis_by_region.values():
                await client.mset(dict.fromkeys(first + second, "cached"))
            invalidator = Invalidator(redis_by_region["us-east"], stream=stream)
            for key in first:
                await invalidator.invalidate(key)
            for region, client in redis_by_region.items():
                await wait_gone(client, first, region=region)

            old.request_drain()

            async def standby_running() -> bool:
                return metric(standby, "invalgw_lease_held", region="us-east") == 1.0

            await wait_until(standby_running, what="the standby to take the lease over")
            for key in second:
                await invalidator.invalidate(key)
            for region, client in redis_by_region.items():
                await wait_gone(client, second, region=region)
            standby.request_drain()


async def test_a_gateway_whose_lease_is_taken_stops_at_once(
    configs: dict[str, RegionConfig],
) -> None:
    east = configs["us-east"]
    lease_key = Names(east.streams.namespace, east.streams.local).lease
    async with clients(configs) as redis_by_region, running(configs, "us-east") as gateways:
        gateway = gateways["us-east"]
        await redis_by_region["us-east"].set(lease_key, "host-z 0123456789ab", px=60_000)
        with anyio.fail_after(10):
            while not gateway.lease_lost:  # noqa: ASYNC110 - polling the gateway's state
                await anyio.sleep(0.02)
    assert metric(gateway, "invalgw_lease_held", region="us-east") == 0.0


async def test_a_restart_in_the_same_slot_takes_its_lease_over_at_once(
    configs: dict[str, RegionConfig],
) -> None:
    """SIGKILLed and restarted under the same consumer name: no wait for the lease to expire."""
    east = configs["us-east"]
    lease_key = Names(east.streams.namespace, east.streams.local).lease
    async with clients(configs) as redis_by_region:
        await redis_by_region["us-east"].set(lease_key, "test 0123456789ab", px=60_000)
        with anyio.fail_after(5):
            async with running(configs, "us-east") as gateways:
                assert metric(gateways["us-east"], "invalgw_lease_held", region="us-east") == 1.0
