"""Every group acknowledges what it handled: after a drain nothing is left pending, and the
forwarders' link state names the last entry delivered."""

from __future__ import annotations

import pytest

from invalgw.config import RegionConfig
from invalgw.producer import Invalidator
from tests.conftest import clients, running, wait_gone, wait_until

pytestmark = pytest.mark.anyio


async def test_nothing_is_left_pending_after_a_drain(configs: dict[str, RegionConfig]) -> None:
    stream = configs["us-east"].streams.local
    keys = [f"{configs['us-east'].streams.namespace}-key:k:{n}" for n in range(40)]
    async with clients(configs) as by_region:
        for client in by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        async with running(configs):
            invalidator = Invalidator(by_region["us-east"], stream=stream)
            for n in range(0, len(keys), 2):
                await invalidator.invalidate(keys[n], keys[n + 1])
            for region, client in by_region.items():
                await wait_gone(client, keys, region=region)

            async def delivered() -> bool:
                groups = await by_region["us-east"].xinfo_groups(stream)
                return all(group["lag"] == 0 for group in groups)

            await wait_until(delivered, what="every group to read every entry")
        groups = await by_region["us-east"].xinfo_groups(stream)
        assert {group["name"]: group["pending"] for group in groups} == {
            b"apply": 0,
            b"to:eu-west": 0,
            b"to:ap-south": 0,
        }
        link = await by_region["us-east"].hgetall(
            f"{configs['us-east'].streams.namespace}:link:eu-west"
        )
        newest = await by_region["us-east"].xrevrange(stream, count=1)
        assert newest
        assert link[b"last"] == newest[0][0]
