"""The local stream is trimmed once its groups have the entries, and only its own groups count."""

from __future__ import annotations

import pytest

from invalgw.config import RegionConfig
from invalgw.producer import Invalidator
from tests.conftest import clients, running, wait_gone, wait_until

pytestmark = pytest.mark.anyio


async def test_a_removed_peer_s_group_does_not_hold_trimming_back(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    """A group left behind by a peer removed from the config (``to:gone``) would keep every
    entry forever; trimming follows the configured stages only."""
    stream = configs["us-east"].streams.local
    keys = [f"{namespace}:k:{i}" for i in range(600)]
    async with clients(configs) as redis_by_region:
        east = redis_by_region["us-east"]
        await east.xgroup_create(stream, "to:gone", id="0", mkstream=True)
        async with running(configs):
            invalidator = Invalidator(east, stream=stream)
            for i in range(0, len(keys), 2):
                await invalidator.invalidate(keys[i], keys[i + 1])
            for region, client in redis_by_region.items():
                await wait_gone(client, keys, region=region)

            async def trimmed() -> bool:
                return int(await east.xlen(stream)) < 200

            await wait_until(trimmed, what="the local stream to be trimmed below 200 entries")
