"""The spine: an invalidation written in one region is applied in every region."""

from __future__ import annotations

import pytest

from invalgw.config import RegionConfig
from invalgw.producer import Invalidator
from tests.conftest import clients, running, wait_gone

pytestmark = pytest.mark.anyio


async def test_invalidation_reaches_every_region(configs: dict[str, RegionConfig]) -> None:
    async with clients(configs) as redis_by_region, running(configs):
        keys = [f"{configs['us-east'].streams.namespace}-key:user:{i}" for i in range(100)]
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        stream = configs["us-east"].streams.local
        invalidator = Invalidator(redis_by_region["us-east"], stream=stream)
        for i in range(0, 100, 2):
            await invalidator.invalidate(keys[i], keys[i + 1])

        for region, client in redis_by_region.items():
            await wait_gone(client, keys, region=region)
