"""One read per entry, fanned out in memory: a sender that falls behind the in-memory feed catches
up from its own cursor and joins again without a gap or a duplicate; a stalled peer holds up
neither the local apply nor the other peers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio

from invalgw.names import Names
from invalgw.proto import Batch, decode_envelope, entry_fields
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
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio


def urls_of(servers: list[RedisServer]) -> dict[str, str]:
    return {region: server.url for region, server in zip(REGIONS, servers, strict=True)}


async def mirror_events(client: redis.asyncio.Redis, mirror: str) -> list[bytes]:
    """Origin IDs of every invalidation in the batches of ``mirror``, in the order appended."""
    ids: list[bytes] = []
    for _, fields in await stream_entries(client, mirror):
        envelope = decode_envelope(fields[b"d"])
        if isinstance(envelope, Batch):
            ids += [event.id.encode() for event in envelope.events]
    return ids


async def test_a_sender_that_overflows_its_feed_catches_up_and_rejoins_in_order(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """With room for one batch in memory, a burst overflows every sender's feed again and again:
    each reads the stream from its cursor and joins again. Every peer still gets every entry
    exactly once, in order, with no gap."""
    configs = make_configs(
        urls_of(session_servers),
        namespace,
        gateway={"batch_size": 5, "feed_batches": 1, "trim_interval_ms": 600_000},
    )
    names = Names(namespace, configs["us-east"].streams.local)
    keys = [f"{namespace}:k{i}" for i in range(600)]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        east = redis_by_region["us-east"]
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        async with east.pipeline(transaction=False) as pipe:
            for i in range(0, len(keys), 2):
                pipe.xadd(names.local_stream, entry_fields(keys[i : i + 2]))  # type: ignore[arg-type]
            written: list[bytes] = await pipe.execute()
        for region, client in redis_by_region.items():
            await wait_gone(client, keys, region=region, seconds=20)
        for peer in ("eu-west", "ap-south"):
            catch_ups = metric(
                gateways["us-east"], "invalgw_sender_catch_ups_total", region="us-east", peer=peer
            )
            assert catch_ups >= 2, f"{peer}: the sender never fell behind the feed"

            async def delivered(peer: str = peer) -> bool:
                sent = await mirror_events(redis_by_region[peer], names.mirror("us-east"))
                return len(sent) >= len(written)

            await wait_until(delivered, what=f"every entry in {peer}'s mirror")
            sent = await mirror_events(redis_by_region[peer], names.mirror("us-east"))
            assert sent == written, f"{peer}: entries missing, repeated or out of order"
            assert await redis_by_region[peer].xlen(names.gaps) == 0


async def test_a_stalled_peer_holds_up_neither_the_local_apply_nor_the_other_peer(
    own_servers: list[RedisServer], namespace: str
) -> None:
    """ap-south's Redis is frozen (SIGSTOP): us-east keeps applying and eu-west keeps receiving
    at their usual pace; once ap-south thaws it gets everything."""
    configs = make_configs(urls_of(own_servers), namespace)
    names = Names(namespace, configs["us-east"].streams.local)
    keys = [f"{namespace}:k{i}" for i in range(40)]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        await wait_until(
            _link_up(gateways["us-east"], "ap-south"), what="the link to ap-south to work first"
        )
        stalled = own_servers[REGIONS.index("ap-south")]
        stalled.pause()
        try:
            for key in keys:
                started = time.monotonic()
                await east.xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]
                await wait_gone(east, [key], region="us-east", seconds=1)
                await wait_gone(west, [key], region="eu-west", seconds=1)
                assert time.monotonic() - started < 1
        finally:
            stalled.resume()
        await wait_gone(redis_by_region["ap-south"], keys, region="ap-south", seconds=10)
        for peer in ("eu-west", "ap-south"):
            assert await redis_by_region[peer].xlen(names.gaps) == 0


def _link_up(gateway: Gateway, peer: str) -> Callable[[], Awaitable[bool]]:
    async def up() -> bool:
        return metric(gateway, "invalgw_link_up", region="us-east", peer=peer) == 1

    return up
