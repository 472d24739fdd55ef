"""Fencing: a gateway whose lease another gateway holds now cannot acknowledge, save a status or
move a sender's cursor, whatever it still has in hand (a stall past the lease: a GC pause, a
frozen VM, SIGSTOP). The Redis refuses those writes atomically, in the lease's slot."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import msgspec
import pytest
import redis
import redis.asyncio

from invalgw.apply import ack_with_status
from invalgw.config import RegionConfig
from invalgw.cursor import SenderCursor
from invalgw.functions import (
    SAVE_CURSOR,
    Fence,
    LeaseNotRenewed,
    call_fenced,
    is_fenced,
    load_library,
)
from invalgw.lag import LinkStatus
from invalgw.metrics import Metrics
from invalgw.names import APPLY_GROUP, Names, forward_group
from invalgw.proto import StreamId, entry_fields, partition_of
from invalgw.read import Entry, GroupReader
from invalgw.stages import Drain, Stage
from tests.conftest import clients, metric, running, wait_gone, wait_until
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio

ME = "gw-a 0123456789ab"
USURPER = "gw-b ba9876543210"


async def pending(client: redis.asyncio.Redis, stream: str, group: str) -> int:
    summary = await client.xpending(stream, group)
    return int(summary["pending"])


async def test_acknowledgement_refused_unless_the_lease_is_ours(
    session_servers: list[RedisServer], namespace: str
) -> None:
    client = redis.asyncio.Redis.from_url(session_servers[0].url)
    try:
        await load_library(client)
        stream, lease, status_key, key = (f"{namespace}:{n}" for n in ("s", "lease", "st", "k"))
        await client.xgroup_create(stream, APPLY_GROUP, id="0", mkstream=True)
        entry_id: bytes = await client.xadd(stream, entry_fields([key]))  # type: ignore[arg-type,assignment]
        await client.xreadgroup(APPLY_GROUP, "c", {stream: ">"})
        reader = GroupReader(client, stream, APPLY_GROUP, "c", count=10, block_ms=0)
        await client.set(key, "cached")
        await client.set(lease, USURPER)
        status = LinkStatus(origin="us-east", region="us-east", applied=1)
        fence = Fence(lease, ME)

        with pytest.raises(redis.ResponseError) as refused:
            await ack_with_status(reader, [entry_id], status_key, status, fence=fence, unlink=[key])
        assert is_fenced(refused.value)
        # the entry stays pending, the status is not written (the key's UNLINK went through,
        # in the same transaction: it was right to remove it, whoever says so)
        assert await pending(client, stream, APPLY_GROUP) == 1
        assert await client.hlen(status_key) == 0

        await client.delete(lease)  # expired: another gateway may take it at any moment
        with pytest.raises(redis.ResponseError) as refused:
            await ack_with_status(reader, [entry_id], status_key, status, fence=fence, unlink=[key])
        assert is_fenced(refused.value)

        await client.set(lease, ME)
        await client.set(key, "cached again")
        removed = await ack_with_status(
            reader, [entry_id], status_key, status, fence=fence, unlink=[key]
        )
        assert removed == 1
        assert await client.exists(key) == 0
        assert await pending(client, stream, APPLY_GROUP) == 0
        assert await client.hexists(status_key, "us-east")
    finally:
        await client.aclose()


async def test_cursor_never_moves_for_a_gateway_that_lost_the_lease(
    session_servers: list[RedisServer], namespace: str
) -> None:
    client = redis.asyncio.Redis.from_url(session_servers[0].url)
    try:
        await load_library(client)
        stream, lease, link = (f"{namespace}:{n}" for n in ("s", "lease", "link"))
        group = forward_group("eu-west")
        ids = [await client.xadd(stream, entry_fields([f"{namespace}:k{i}"])) for i in range(3)]  # type: ignore[arg-type]
        await client.set(lease, USURPER)
        cursor = SenderCursor(
            name="to:eu-west",
            reader=GroupReader(client, stream, group, "c", count=10, block_ms=0),
            local=client,
            link_key=link,
            fence=Fence(lease, ME),
            reclaimed=Metrics("us-east").reclaimed.labels("us-east", "to:eu-west"),
            on_lost=nothing_lost,
        )
        await cursor.load()
        state = {"epoch": "e1", "last": str(StreamId.parse(ids[-1]))}
        with pytest.raises(redis.ResponseError) as refused:
            await cursor.save(state=state, gap=None, cursor=StreamId.parse(ids[-1]), count=3)
        assert is_fenced(refused.value)
        [info] = await client.xinfo_groups(stream)
        assert info["last-delivered-id"] == b"0-0"
        assert await client.exists(link) == 0

        await client.set(lease, ME)
        assert await cursor.save(state=state, gap=None, cursor=StreamId.parse(ids[-1]), count=3)
        [info] = await client.xinfo_groups(stream)
        assert info["last-delivered-id"] == ids[-1]
        assert info["lag"] == 0
        assert await client.hget(link, "last") == ids[-1]

        # a holder with an older position in memory (it took the lease back after a stall)
        # does not move the cursor back
        await call_fenced(
            client, SAVE_CURSOR, Fence(lease, ME), [stream, link], [group, ids[0], 1, "", "", 0]
        )
        [info] = await client.xinfo_groups(stream)
        assert info["last-delivered-id"] == ids[-1]
    finally:
        await client.aclose()


async def nothing_lost(_ids: list[bytes]) -> None:
    raise AssertionError("no entry was deleted")


def long_lease(configs: dict[str, RegionConfig], **streams: int) -> dict[str, RegionConfig]:
    """Leases renewed only every 20 s: within a test, only the fence can stop a stale gateway."""
    return {
        name: msgspec.structs.replace(
            config,
            gateway=msgspec.structs.replace(config.gateway, lease_ms=60_000),
            streams=msgspec.structs.replace(config.streams, **streams),
        )
        for name, config in configs.items()
    }


@pytest.mark.parametrize("partitions", [1, 2])
async def test_a_gateway_whose_lease_was_taken_leaves_its_batch_to_the_new_owner(
    configs: dict[str, RegionConfig], namespace: str, partitions: int
) -> None:
    """Another gateway takes the lease (as after this one stalled past it): the batch this one
    reads next is not acknowledged; once the lease is back the same entry goes through."""
    configs = long_lease(configs, partitions=partitions)
    east = configs["us-east"]
    base = Names(east.streams.namespace, east.streams.local)
    names = base.partition(0, partitions)
    key = next(
        key
        for key in (f"{namespace}:fenced{i}" for i in range(1000))
        if partition_of(key, partitions) == 0
    )
    async with clients(configs) as redis_by_region, running(configs, "us-east") as gateways:
        client = redis_by_region["us-east"]
        gateway = gateways["us-east"]

        async def leased() -> bool:
            return await client.get(names.lease) is not None

        await wait_until(leased, what="the lease taken")
        ours = await client.get(names.lease)
        assert ours is not None
        await client.set(names.lease, USURPER, px=60_000)
        await client.set(key, "cached")
        await client.xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]

        async def refused() -> bool:
            return metric(gateway, "invalgw_fenced_writes_total", region="us-east") >= 1

        await wait_until(refused, what="the acknowledgement refused")
        assert await pending(client, names.local_stream, APPLY_GROUP) == 1

        await client.set(names.lease, ours, px=60_000)  # the lease is this gateway's again
        await wait_gone(client, [key], region="us-east")

        async def acknowledged() -> bool:
            return await pending(client, names.local_stream, APPLY_GROUP) == 0

        await wait_until(acknowledged, what="the entry acknowledged")


async def test_a_gap_is_told_once_though_saving_its_delivery_failed(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    """The envelope carrying a gap reached the peer, but the save that follows was refused (or
    lost with the connection): the envelopes sent after it must not carry the gap again, or the
    peer records it (and resyncs) once per envelope."""
    configs = long_lease(configs)
    east = configs["us-east"]
    names = Names(east.streams.namespace, east.streams.local)
    gap = ("1-0", "2-0")
    async with clients(configs) as redis_by_region, running(configs, "us-east", "eu-west") as gw:
        client, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        west_names = Names(configs["eu-west"].streams.namespace, configs["eu-west"].streams.local)
        ours = await client.get(names.lease)
        assert ours is not None
        await client.set(names.lease, USURPER, px=60_000)
        await gw["us-east"].forwarders["eu-west"].add_gap(*gap)
        written = 0

        async def refused_while_writing() -> bool:
            """Entries keep coming, so envelopes with new events follow the gap's."""
            nonlocal written
            await client.xadd(names.local_stream, entry_fields([f"{namespace}:w{written}"]))  # type: ignore[arg-type]
            written += 1
            fenced = metric(gw["us-east"], "invalgw_fenced_writes_total", region="us-east")
            return written >= 20 and fenced >= 5

        await wait_until(refused_while_writing, what="saves refused while envelopes went on")
        await client.set(names.lease, ours, px=60_000)

        async def gap_forgotten() -> bool:
            return not await client.hexists(names.link("eu-west"), "gap_after")

        await wait_until(gap_forgotten, what="the delivered gap cleared from the link state")
        records: list[tuple[bytes, dict[bytes, bytes]]] = await west.xrange(west_names.gaps)  # type: ignore[assignment]
        told = [(f[b"after"], f[b"upto"]) for _, f in records if f[b"origin"] == b"us-east"]
        assert told == [(b"1-0", b"2-0")]


async def test_a_process_that_did_not_renew_its_lease_lately_reads_nothing(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """Frozen past its lease (SIGSTOP, a paused VM), a process wakes up before its lease loop
    notices: its stages must not read entries that another process owns now (that owner's
    sender would take what it reads next as following what it read before, and skip them)."""
    client = redis.asyncio.Redis.from_url(session_servers[0].url)
    stream = f"{namespace}:s"
    await client.xgroup_create(stream, APPLY_GROUP, id="0", mkstream=True)
    renewed = False
    handled: list[bytes] = []
    refusals: list[Exception] = []

    async def handle(entries: Sequence[Entry]) -> None:
        handled.extend(entry_id for entry_id, _ in entries)
        await client.xack(stream, APPLY_GROUP, *(entry_id for entry_id, _ in entries))

    drain = Drain()
    stage = Stage(
        "apply",
        GroupReader(client, stream, APPLY_GROUP, "c", count=10, block_ms=50),
        handle,
        drain=drain,
        on_error=refusals.append,
        fence=Fence(f"{namespace}:lease", ME, lambda: renewed),
        claim_interval_ms=60_000,
        claim_idle_ms=60_000,
        backoff_cap_ms=50,
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(stage.run)
            entry_id = await client.xadd(stream, entry_fields([f"{namespace}:k"]))  # type: ignore[arg-type]

            async def refused_thrice() -> bool:
                return len(refusals) >= 3

            await wait_until(refused_thrice, what="reads held back")
            assert all(isinstance(exc, LeaseNotRenewed) for exc in refusals)
            [group] = await client.xinfo_groups(stream)
            assert (handled, group["pending"], group["lag"]) == ([], 0, 1)  # not even delivered

            renewed = True

            async def read_now() -> bool:
                return handled == [entry_id]

            await wait_until(read_now, what="the entry read once the lease is renewed")
            drain.request()
    finally:
        await client.aclose()
