"""The local stream is trimmed once its groups have the entries, and only its own groups count."""

from __future__ import annotations

import pytest

from invalgw.config import RegionConfig
from invalgw.names import APPLY_GROUP
from invalgw.producer import Invalidator
from invalgw.trim import trim_stream
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


async def test_a_group_named_in_binary_with_pending_entries_does_not_stop_trimming(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    """Another application reads the stream with a group whose name is not UTF-8, and holds
    entries pending: trimming must go on (a round that fails on it never trims again)."""
    stream = f"{namespace}:stream"
    async with clients(configs) as redis_by_region:
        east = redis_by_region["us-east"]
        for i in range(300):
            await east.xadd(stream, {"op": "unlink", "keys": f"{namespace}:k:{i}"})
        await east.xgroup_create(stream, APPLY_GROUP, id="$")  # read and acknowledged all
        await east.xgroup_create(stream, b"other-\xff", id="0")
        await east.xreadgroup(b"other-\xff", "c", {stream: ">"}, count=10)  # type: ignore[arg-type]
        try:
            await trim_stream(east, stream, max_len=100, groups_needed=[APPLY_GROUP])
            assert await east.xlen(stream) <= 100
        finally:
            await east.delete(stream)
