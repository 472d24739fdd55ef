"""Trimming accounts for every entry a group had not received, from stream IDs alone."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis.asyncio

from invalgw.proto import StreamId
from invalgw.trim import (
    FULL_ROUND_EVERY,
    MAX_INTERVAL_S,
    GroupPosition,
    StreamTrimmer,
    cap_margin,
)
from tests.conftest import wait_until
from tests.servers import RedisServer, no_retry, redis_servers

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(session_servers: list[RedisServer]) -> AsyncIterator[redis.asyncio.Redis]:
    made = redis.asyncio.Redis.from_url(
        session_servers[0].url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
    )
    yield made
    await made.aclose()


class Gaps:
    def __init__(self) -> None:
        self.seen: list[tuple[str, StreamId, StreamId]] = []

    async def __call__(self, group: str, after: str, upto: str) -> None:
        self.seen.append((group, StreamId.parse(after), StreamId.parse(upto)))

    def covered(self, group: str, ids: list[bytes]) -> bool:
        """Every one of ``ids`` lies in a reported range of ``group``."""
        ranges = [(a, u) for g, a, u in self.seen if g == group]
        return all(any(a < StreamId.parse(i) <= u for a, u in ranges) for i in ids)


async def write(client: redis.asyncio.Redis, stream: str, count: int) -> list[bytes]:
    async with client.pipeline(transaction=False) as pipe:
        for n in range(count):
            pipe.xadd(stream, {"op": "unlink", "keys": f"k{n}"})
        ids: list[bytes] = await pipe.execute()
    return ids


async def read(client: redis.asyncio.Redis, stream: str, group: str, count: int) -> list[bytes]:
    reply: Any = await client.xreadgroup(group, "c", {stream: ">"}, count=count)
    ids = [entry_id for entry_id, _ in reply[0][1]] if reply else []
    if ids:
        await client.xack(stream, group, *ids)
    return ids


async def test_the_cap_reports_exactly_what_a_group_never_read(
    client: redis.asyncio.Redis, namespace: str
) -> None:
    stream = f"{namespace}:s"
    ids = await write(client, stream, 50)
    await client.xgroup_create(stream, "apply", id="0")
    await client.xgroup_create(stream, "to:peer", id="0")
    await read(client, stream, "apply", 50)
    gaps = Gaps()
    trimmer = StreamTrimmer(client, stream, max_len=20, on_gap=gaps, reported_key=f"{namespace}:l")
    await trimmer.round()
    assert int(await client.xlen(stream)) == 20
    assert gaps.seen == [("to:peer", StreamId(0, 0), StreamId.parse(ids[29]))]
    await trimmer.round()
    assert len(gaps.seen) == 1, "a loss is reported once"
    again = StreamTrimmer(client, stream, max_len=20, on_gap=gaps, reported_key=f"{namespace}:l")
    await again.round()
    assert len(gaps.seen) == 1, "nor again after a restart"


async def test_a_producer_s_trim_between_rounds_is_reported_though_the_group_read_past_it(
    client: redis.asyncio.Redis, namespace: str
) -> None:
    """The group's next read jumps over the hole: its position at the last round shows it."""
    stream = f"{namespace}:s"
    ids = await write(client, stream, 50)
    await client.xgroup_create(stream, "to:peer", id="0")
    delivered = await read(client, stream, "to:peer", 10)
    gaps = Gaps()
    trimmer = StreamTrimmer(client, stream, max_len=1000, on_gap=gaps)
    await trimmer.round()
    assert gaps.seen == []
    # a producer's trim: entries 11..30 never read
    await client.xtrim(stream, maxlen=20, approximate=False)
    delivered += await read(client, stream, "to:peer", 100)
    await trimmer.round()
    lost = [entry_id for entry_id in ids if entry_id not in delivered]
    assert len(lost) == 20
    assert gaps.covered("to:peer", lost)
    assert not gaps.covered("to:peer", [ids[9]]), "the range starts after what was delivered"


async def test_pending_entries_hold_trimming_back_below_the_cap(
    client: redis.asyncio.Redis, namespace: str
) -> None:
    """Read is not handled: entries stay until acknowledged (a pending entry deleted all the
    same is the stage's to report, when it finds it gone)."""
    stream = f"{namespace}:s"
    await write(client, stream, 300)
    await client.xgroup_create(stream, "apply", id="0")
    await client.xreadgroup("apply", "c", {stream: ">"}, count=300)  # read, never acknowledged
    gaps = Gaps()
    await StreamTrimmer(client, stream, max_len=1000, on_gap=gaps).round()
    assert int(await client.xlen(stream)) == 300
    assert gaps.seen == []


async def test_backlog_comes_from_ids_and_is_zero_once_drained(
    client: redis.asyncio.Redis, namespace: str
) -> None:
    stream = f"{namespace}:s"
    await write(client, stream, 40)
    await client.xgroup_create(stream, "apply", id="0")
    await client.xgroup_create(stream, "to:peer", id="0")
    await read(client, stream, "apply", 40)
    await read(client, stream, "to:peer", 15)
    await client.xreadgroup("to:peer", "c", {stream: ">"}, count=5)
    trimmer = StreamTrimmer(client, stream, max_len=1000)
    backlog = {group.name: group.backlog for group in await trimmer.round()}
    assert backlog == {"apply": 0, "to:peer": 25}
    # Counters Redis can get wrong (entries-read after an AOF rewrite and restart) are not
    # trusted when they disagree with the stream: a group moved by SETID has no entries-read.
    await client.xgroup_setid(stream, "to:peer", "$")
    backlog = {group.name: group.backlog for group in await trimmer.round()}
    assert backlog == {"apply": 0, "to:peer": 5}  # the 5 still pending


def test_the_cap_margin_is_small() -> None:
    assert cap_margin(1000) == 250
    assert cap_margin(1_000_000) == 10_000


async def test_backlog_is_zero_once_drained_after_an_aof_rewrite_and_restart(
    namespace: str,
) -> None:
    with redis_servers(1, "--appendonly", "yes") as [server]:
        client = redis.asyncio.Redis.from_url(
            server.url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
        )
        stream = f"{namespace}:s"
        try:
            await write(client, stream, 200)
            await client.xgroup_create(stream, "apply", id="0")
            await read(client, stream, "apply", 150)
            await client.xtrim(stream, maxlen=100, approximate=False)
            await client.bgrewriteaof()

            async def rewritten() -> bool:
                info = await client.info("persistence")
                return not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]

            await wait_until(rewritten, what="the AOF rewrite")
            await client.aclose()
            server.terminate()
            server.restart()
            client = redis.asyncio.Redis.from_url(
                server.url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
            )
            trimmer = StreamTrimmer(client, stream, max_len=1000)
            assert {g.name: g.backlog for g in await trimmer.round()} == {"apply": 50}
            await read(client, stream, "apply", 100)
            assert {g.name: g.backlog for g in await trimmer.round()} == {"apply": 0}
            await write(client, stream, 10)
            await read(client, stream, "apply", 10)
            assert {g.name: g.backlog for g in await trimmer.round()} == {"apply": 0}
        finally:
            await client.aclose()


@pytest.mark.parametrize("new_epoch_first", [True, False], ids=["rotated", "epoch-gone"])
async def test_a_stream_lost_with_its_history_leaves_no_memory_to_report_a_second_gap(
    client: redis.asyncio.Redis, namespace: str, *, new_epoch_first: bool
) -> None:
    """Redis restarted empty: the new epoch's gap (recorded by the readers) covers the lost
    history. What the trimmer remembered of the lost stream (a group's next entry, the highest
    deleted ID) is forgotten, whether its first round over the new stream comes after a reader
    started the new epoch or before (the epoch key still gone); a loss in the new stream is
    reported as ever."""
    stream, epoch_key, lost = f"{namespace}:s", f"{namespace}:epoch", f"{namespace}:lost"
    await client.set(epoch_key, "old")
    old = await write(client, stream, 5)
    await client.xgroup_create(stream, "apply", id="0")
    await client.xgroup_create(stream, "to:peer", id="0")
    await read(client, stream, "apply", 5)
    await read(client, stream, "to:peer", 2)  # behind: its next entry is remembered
    await client.xdel(stream, old[1])  # had by both: the highest deleted ID is remembered
    gaps = Gaps()
    trimmer = StreamTrimmer(
        client,
        stream,
        max_len=1000,
        on_gap=gaps,
        groups_needed=["apply", "to:peer"],
        reported_key=lost,
        epoch_key=epoch_key,
    )
    await trimmer.round()
    assert gaps.seen == []

    await client.delete(stream, epoch_key, lost)  # what Redis held for this test: restarted empty
    for group in ("apply", "to:peer"):  # the readers find their groups gone
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    if new_epoch_first:
        await client.set(epoch_key, "new")
    new = await write(client, stream, 30)
    await trimmer.round()
    await client.set(epoch_key, "new")
    await trimmer.round()
    assert gaps.seen == [], "the new epoch's gap covers the lost stream: nothing more to report"

    await read(client, stream, "apply", 30)
    trimmer.max_len = 10
    await trimmer.round()
    assert gaps.seen == [("to:peer", StreamId(0, 0), StreamId.parse(new[19]))]


async def test_a_round_over_an_unchanged_stream_trims_nothing_and_a_change_is_trimmed(
    client: redis.asyncio.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle region's stream is looked at ten times a second: while nothing was added, read,
    acknowledged or deleted, a round only reads; the first change gets a full round."""
    stream = f"{namespace}:s"
    await write(client, stream, 30)
    await client.xgroup_create(stream, "apply", id="0")
    await read(client, stream, "apply", 30)
    trimmer = StreamTrimmer(client, stream, max_len=1000)
    trims = 0
    real_trim = trimmer._trim

    async def counted(groups: Any) -> Any:
        nonlocal trims
        trims += 1
        return await real_trim(groups)

    monkeypatch.setattr(trimmer, "_trim", counted)
    await trimmer.round()
    assert trims == 1
    for _ in range(3):
        [group] = await trimmer.round()
        assert group.backlog == 0
    assert trims == 1, "nothing changed: nothing to trim"
    await write(client, stream, 30)  # not read yet: the backlog shows
    [group] = await trimmer.round()
    assert trims == 2
    assert group.backlog == 30


class CutOffByARestart(StreamTrimmer):
    """A trimmer whose Redis shuts down gracefully right after running its trim: a Redis told
    to stop runs the commands it has read, persists them, and answers nothing more."""

    server: RedisServer | None = None

    async def _trim(self, groups: list[GroupPosition]) -> Any:
        trimmed = await super()._trim(groups)
        if self.server is None:
            return trimmed
        self.server.terminate()
        self.server.restart()
        self.server = None
        raise redis.ConnectionError("the Redis went away before answering")


async def test_a_round_cut_off_by_a_graceful_restart_after_its_trim_reports_no_loss(
    namespace: str,
) -> None:
    """The next round measures from the positions that trim followed, not from the round
    before: the group had every entry the trim took (a false gap costs a peer a resync)."""
    with redis_servers(1, "--appendonly", "yes", "--stream-node-max-entries", "10") as [server]:
        client = redis.asyncio.Redis.from_url(
            server.url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
        )
        stream = f"{namespace}:s"
        try:
            ids = await write(client, stream, 30)
            await client.xgroup_create(stream, "to:peer", id="0")
            await client.xgroup_setid(stream, "to:peer", ids[9], entries_read=10)
            gaps = Gaps()
            trimmer = CutOffByARestart(client, stream, max_len=1000, on_gap=gaps)
            await trimmer.round()  # the group has 10 entries; the 11th is next
            await client.xgroup_setid(stream, "to:peer", ids[29], entries_read=30)
            trimmer.server = server
            with pytest.raises(redis.ConnectionError):
                await trimmer.round()  # trims the first 20 (whole nodes), answers nothing
            await client.connection_pool.disconnect()
            assert int(await client.xlen(stream)) == 10, "the AOF kept the trim"
            await trimmer.round()
            assert gaps.seen == []
        finally:
            await client.aclose()


async def test_a_sender_moving_its_cursor_past_claimed_entries_mid_round_is_no_loss(
    client: redis.asyncio.Redis, namespace: str
) -> None:
    """A restarted sender sends its claimed pending entries again from just before the first,
    then moves its cursor past them and acknowledges them in one step. A round that saw the
    cursor from before that step and the pending list from after it would take the entry a
    producer deleted among them for a loss of the trimmer's own; the sender reports it."""
    stream, group = f"{namespace}:s", "to:peer"
    gaps = Gaps()
    for attempt in range(60):
        await client.delete(stream)
        ids = await write(client, stream, 3)
        await client.xgroup_create(stream, group, id="0")
        await client.xreadgroup(group, "dead", {stream: ">"})
        await client.xdel(stream, ids[1])
        await client.xautoclaim(stream, group, "sender", 0, "0")  # drops the deleted one
        await client.xgroup_setid(stream, group, str(StreamId.parse(ids[0]).previous()))
        trimmer = StreamTrimmer(client, stream, max_len=1000, on_gap=gaps, groups_needed=[group])

        async def move_on(*, delay: int = attempt % 4, ids: list[bytes] = ids) -> None:
            for _ in range(delay):
                await client.ping()
            async with client.pipeline(transaction=True) as pipe:
                pipe.xgroup_setid(stream, group, ids[2])
                pipe.xack(stream, group, ids[0], ids[2])
                await pipe.execute()

        async with anyio.create_task_group() as tg:
            tg.start_soon(move_on)
            await trimmer.round()
    assert gaps.seen == []


async def test_rounds_come_fast_only_while_the_stream_is_near_its_cap(
    client: redis.asyncio.Redis, namespace: str
) -> None:
    """At a high rate a stream every group keeps short needs no more rounds than a quiet one;
    one near its cap needs them often enough that the margin over the cap holds."""
    short, full = f"{namespace}:short", f"{namespace}:full"
    far = StreamTrimmer(client, short, max_len=1_000_000)
    near = StreamTrimmer(client, full, max_len=1_000)
    for trimmer in (far, near):
        await write(client, trimmer.stream, 900)
        await client.xgroup_create(trimmer.stream, "behind", id="0")  # reads nothing
        await trimmer.round()
        await write(client, trimmer.stream, 2_000)  # fast: a few milliseconds
        await trimmer.round()
    assert far.interval_s == MAX_INTERVAL_S
    assert near.interval_s < MAX_INTERVAL_S
    assert int(await client.xlen(full)) <= 1_000 + cap_margin(1_000)


async def test_an_idle_stream_is_only_looked_at_and_a_change_is_seen_at_once() -> None:
    """Ten rounds a second on every stream: while nothing moves and every group has it all, a
    round is one ``XINFO STREAM``; an entry added, or a group moved back by an operator, shows
    in the groups' backlog at the next round (added) or within :data:`FULL_ROUND_EVERY` (moved)."""
    with redis_servers(1) as (server,):
        client = redis.asyncio.Redis.from_url(
            server.url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
        )
        stream, groups = "s", ["apply", "to:peer"]
        await write(client, stream, 5)
        for group in groups:
            await client.xgroup_create(stream, group, id="$")
        trimmer = StreamTrimmer(client, stream, max_len=1000, groups_needed=groups)

        async def calls(command: str) -> int:
            stats: Any = await client.info("commandstats")
            return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

        async def backlogs() -> dict[str, int]:
            return {group.name: group.backlog for group in await trimmer.round()}

        assert await backlogs() == {"apply": 0, "to:peer": 0}
        xinfo, xpending = await calls("xinfo|stream"), await calls("xpending")
        for _ in range(FULL_ROUND_EVERY - 1):
            assert await backlogs() == {"apply": 0, "to:peer": 0}
        assert await calls("xpending") == xpending
        assert await calls("xinfo|stream") == xinfo + FULL_ROUND_EVERY - 1

        await write(client, stream, 1)
        assert await backlogs() == {"apply": 1, "to:peer": 1}
        for group in groups:
            await read(client, stream, group, 10)
        assert await backlogs() == {"apply": 0, "to:peer": 0}

        await client.xgroup_setid(stream, "to:peer", "0")  # an operator sends it all again
        seen = [await backlogs() for _ in range(FULL_ROUND_EVERY)]
        assert {"apply": 0, "to:peer": 6} in seen
        await client.aclose()
