"""Trimming a stream, and accounting for every entry a consumer group had not received.

Trimming follows the slowest consumer group: an entry goes only once every group (local apply and
every peer) has it. Above the cap (``streams.max_len``) the oldest entries go anyway. Each round
reads every group's position from Redis (``XINFO GROUPS``, and the oldest pending entry), so what
a group lost is known from stream IDs alone, whatever its stage holds in memory, and whoever
deleted the entries (this cap, a producer's ``XTRIM`` or ``XADD MAXLEN``, an ``XDEL``):

- a group was handed every entry up to its last-delivered ID. Trimming waits for its pending
  entries too (read, not yet handled); one deleted all the same is found and reported by the
  group's own stage (:meth:`invalgw.read.GroupReader.claim`);
- an entry after the last-delivered ID that is no longer in the stream is lost to the group: the
  range reported is (last-delivered ID, last deleted ID], checked before this round's trim
  (deletions by others since the last round, against the position then) and after it (this
  trim). A round cut off once its trim was sent counts as one (a Redis stopped gracefully runs
  the commands it read, keeps them in its AOF, and answers nothing more). The last deleted ID is
  the greater of ``max-deleted-entry-id`` (XDEL) and the entry before the first one, when an
  entry seen after the position is gone (trimming: Redis 7.0 does not move
  ``max-deleted-entry-id`` when it trims);
- the range is reported once; what was reported is kept in Redis (hash ``<namespace>:lost``), so a
  restarted gateway does not report it again;
- what a round remembers for the next (positions, the next entries, the highest deleted ID)
  belongs to one history of the stream: when the region's epoch key (:mod:`invalgw.epoch`) is
  gone (Redis restarted empty) or changed (the stream was lost and a reader started a new epoch),
  it is forgotten. The new epoch's gap already covers the lost history; positions in the lost
  stream compared with the new one would report a second, redundant range.

How exact: the upper bound is the last deleted ID; the lower bound is the group's position, which
can be a little early (by what the group read during the round's few milliseconds, or since the
last round when someone else deleted entries). The range never misses a lost ID the gateway was
running to see deleted. Redis 7.0 forgets ``max-deleted-entry-id`` in an AOF rewrite and restart;
the gateway remembers the highest it saw, but deletions made while no gateway ran, just before
such a restart, show only as pending entries found deleted (reported by the stage that held
them).

While the stream is idle and every group has all of it, a round only looks at the stream (one
``XINFO STREAM``): nothing a group could lose or trimming could take has moved; every
:data:`FULL_ROUND_EVERY`-th round reads the groups all the same.

Rounds come at least every :data:`MAX_INTERVAL_S`, and more often when the stream grows fast near
its cap, so that at most a quarter of the room left below ``max_len + cap_margin`` (near the cap:
a quarter of :func:`cap_margin`) arrives between two; while the stream grows, the cap is
trimmed ahead by what is expected before the next round (at most half the margin), so a round
three times slower than planned still keeps it within the margin.
So the stream holds at most ``max_len + cap_margin(max_len)`` entries (1% over the cap, at least
250 entries), at any write rate up to ``cap_margin / 4 / MIN_INTERVAL_S`` (6,250/s for a cap
below 25,000; proportionally more for larger caps).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import redis

from invalgw.connections import AsyncRedis, call, transaction
from invalgw.proto import StreamId
from invalgw.proto.streamid import ZERO

log = logging.getLogger(__name__)

OnGap = Callable[[str, str, str], Awaitable[None]]
"""Called with (group, after, upto) when entries the group had not received left the stream."""

MIN_INTERVAL_S = 0.01
"""Trimming runs at most this often, however fast the stream grows."""

MAX_INTERVAL_S = 0.1
"""Trimming runs at least this often: a burst is seen within a tenth of a second."""

FULL_ROUND_EVERY = 10
"""While a stream is idle and every group has all of it, one round in this many reads the groups;
the others only look at the stream (see :meth:`StreamTrimmer.round`)."""

WARN_EVERY_S = 10.0

BACKLOG_COUNT_LIMIT = 1000
"""Entries counted at most with XRANGE when the group's counters cannot be trusted."""


def cap_margin(max_len: int) -> int:
    """How far over ``max_len`` a stream trimmed by the gateway may be: 1% of the cap, at least
    250 entries (rounds come often enough that a quarter of it arrives between two)."""
    return max(250, max_len // 100)


@dataclass
class StreamState:
    length: int
    first: StreamId | None
    last_generated: StreamId
    max_deleted: StreamId
    entries_added: int | None

    @property
    def gone_upto(self) -> StreamId:
        """Every entry up to this ID is no longer in the stream."""
        return self.first.previous() if self.first is not None else self.last_generated

    @classmethod
    def parse(cls, info: dict[Any, Any]) -> StreamState:
        first = info.get("first-entry")
        added = info.get("entries-added")
        return cls(
            length=int(info["length"]),
            first=StreamId.parse(first[0]) if first else None,
            last_generated=StreamId.parse(info.get("last-generated-id", b"0-0")),
            max_deleted=StreamId.parse(info.get("max-deleted-entry-id", b"0-0")),
            entries_added=None if added is None else int(added),
        )


@dataclass
class GroupPosition:
    name: str
    last_delivered: StreamId
    pending: int
    entries_read: int | None
    has: StreamId
    """The group has every entry up to this ID (or lost it, and was told)."""
    received: StreamId = ZERO
    """Every entry up to this ID was delivered to the group: its last-delivered ID, or its
    newest pending entry if a sender moved its cursor back to send those again. One deleted
    meanwhile is the group's own stage to report (it finds it pending), not this trimmer."""
    backlog: int = 0
    """Entries not yet handled by the group: pending, plus those not read yet."""
    raw_name: bytes = b""
    """The name as Redis holds it (:attr:`name` shows bytes that are not UTF-8 escaped)."""

    @classmethod
    def parse(cls, group: dict[Any, Any]) -> GroupPosition:
        read = group.get("entries-read")
        last = StreamId.parse(group["last-delivered-id"])
        return cls(
            name=group["name"].decode(errors="backslashreplace"),  # anyone may name a group
            last_delivered=last,
            pending=int(group["pending"]),
            entries_read=None if read is None else int(read),
            has=last,
            received=last,
            raw_name=group["name"],
        )


class StreamTrimmer:
    """Trims one stream round after round, and reports what each group lost (see the module)."""

    def __init__(
        self,
        client: AsyncRedis,
        stream: str,
        *,
        max_len: int,
        on_gap: OnGap | None = None,
        groups_needed: Collection[str] = (),
        reported_key: str | None = None,
        epoch_key: str | None = None,
    ) -> None:
        self.client = client
        self.stream = stream
        self.max_len = max_len
        self.on_gap = on_gap
        self.groups_needed = groups_needed
        self.reported_key = reported_key
        self.epoch_key = epoch_key
        self._epoch: bytes | None = b""
        """The epoch what is remembered belongs to (b"": not read yet; None: the key was gone)."""
        self._reported: dict[str, StreamId] | None = None
        self._group_names: list[bytes] = []
        self._had: dict[str, StreamId] = {}
        """Each group's last-delivered ID at the end of the last round."""
        self._added: tuple[float, int] | None = None
        self._max_deleted = StreamId(0, 0)
        self._headroom = 0
        self._warned: dict[str, float] = {}
        """Entries expected before the next round: trimmed ahead while the stream grows."""
        self._next: dict[str, StreamId | None] = {}
        """Each group's next entry at the end of the last round (None: it had them all)."""
        self.interval_s = MAX_INTERVAL_S
        """When the next round should run, at the stream's current growth."""
        self._settled: tuple[Any, ...] | None = None
        """The stream and its groups as the last trim left them."""
        self._idle: tuple[tuple[Any, ...], list[GroupPosition]] | None = None
        """The stream as the last round found it, and the groups, when every group had it all."""
        self._probes = 0
        """Rounds that only probed the stream since the last full one."""

    async def round(self) -> list[GroupPosition]:
        """Report losses, trim, report what the trim cost; returns each group's position."""
        try:
            unmoved = await self._unmoved_groups()
            if unmoved is not None:
                return unmoved
            self._idle, self._probes = None, 0
            state, groups = await self._read()
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower() and "NOGROUP" not in str(exc):
                return []  # no stream yet (a group gone meanwhile, NOGROUP, is worth a warning)
            raise
        self._pace(state)
        missing = set(self.groups_needed) - {group.name for group in groups}
        if not groups or missing:
            if missing:
                log.debug("not trimming %s: groups %s do not exist yet", self.stream, missing)
            return groups
        groups = _without_strangers(self.stream, groups, self.groups_needed)
        if _settled(state, groups) != self._settled:
            await self._report(groups, state, self._next, since_last_round=True)
            # Before the trim: a Redis shutting down may run it and answer nothing, and the next
            # round must not take what it deleted below these positions for a loss.
            self._had = {group.name: group.received for group in groups}
            state, before, self._next = await self._trim(groups)
            await self._report(groups, state, before, since_last_round=False)
            self._settled = _settled(state, groups)
        # else nothing was added, read, acknowledged or deleted since the last trim: it would
        # trim nothing and find no loss (an idle region's stream, ten times a second)
        for group in groups:
            group.backlog = group.pending + await self._unread(group, state)
        if not any(group.backlog for group in groups):
            self._idle = (_stream_shape(state), groups)
        return groups

    async def _unmoved_groups(self) -> list[GroupPosition] | None:
        """The groups as the last round found them, if the stream is as it left it and every
        group had all of it: then no group can have moved, and one ``XINFO STREAM`` stands for a
        round (a tenth of what the round's transaction costs), but every
        :data:`FULL_ROUND_EVERY`-th (a group an operator moved or created is seen within it).
        None: a full round is due."""
        if self._idle is None or self._probes >= FULL_ROUND_EVERY - 1:
            return None
        shape, groups = self._idle
        info = await call(self.client, "XINFO", "STREAM", self.stream)
        state = self._remember(StreamState.parse(_fields(info)))
        if _stream_shape(state) != shape:
            return None
        self._probes += 1
        self._pace(state)
        return groups

    async def _read(self) -> tuple[StreamState, list[GroupPosition]]:
        """The stream, its groups and their pending entries, as one MULTI saw them: a sender
        that acknowledges its pending entries as it moves its cursor on must not be seen with
        the cursor before the move and the pending entries after it (a loss that is not)."""
        for _ in range(3):
            state, groups, stale = await self._read_with_pending(self._group_names)
            self._group_names = [group.raw_name for group in groups]
            if not stale:
                return state, groups
        raise redis.RedisError(f"groups of {self.stream} keep appearing; trimmed next round")

    async def _read_with_pending(
        self, names: list[bytes]
    ) -> tuple[StreamState, list[GroupPosition], bool]:
        """As :meth:`_read`, with the pending summary of the groups ``names`` (those of the last
        read); True if a group with pending entries was not among them: read again."""
        commands: list[tuple[Any, ...]] = [
            ("XINFO", "STREAM", self.stream),
            ("XINFO", "GROUPS", self.stream),
            *(("XPENDING", self.stream, name) for name in names),
        ]
        if self.epoch_key is not None:
            commands.append(("GET", self.epoch_key))
        replies = await transaction(self.client, commands, raise_on_error=False)
        for reply in replies[:2]:
            if isinstance(reply, Exception):
                raise reply
        info, raw_groups, summaries = replies[0], replies[1], replies[2 : 2 + len(names)]
        if self.epoch_key is not None:
            self._follow_epoch(replies[-1])
        groups = [GroupPosition.parse(_fields(group)) for group in raw_groups]
        pending = dict(zip(names, summaries, strict=True))
        stale = False
        for group in groups:
            summary = pending.get(group.raw_name)
            if not isinstance(summary, list):  # a group created since the last read
                stale = stale or group.pending > 0
            elif summary[1] is not None:  # [count, lowest ID, highest ID, consumers]
                group.has = min(group.has, StreamId.parse(summary[1]).previous())
                group.received = max(group.received, StreamId.parse(summary[2]))
        return self._remember(StreamState.parse(_fields(info))), groups, stale

    def _follow_epoch(self, epoch: bytes | None) -> None:
        """Forget what was remembered of the stream when its history was lost: the epoch key is
        gone (Redis restarted empty) or another one (a reader started a new epoch). Its coming
        back after being gone is the new epoch of the same loss: nothing more to forget."""
        if self._epoch and epoch != self._epoch:
            log.info("stream %s: history lost; its positions are forgotten", self.stream)
            self._had, self._next, self._reported = {}, {}, None
            self._max_deleted, self._added = StreamId(0, 0), None
        self._epoch = epoch

    def _pace(self, state: StreamState) -> None:
        """Shorten the interval so that at most a quarter of the room left below the cap (and
        its margin) arrives between rounds: rounds come fast only while the stream is near its
        cap, not while every group keeps it short at a high rate."""
        now = time.monotonic()
        if state.entries_added is None:
            return
        if self._added is not None and now > self._added[0]:
            rate = (state.entries_added - self._added[1]) / (now - self._added[0])
            self.interval_s, self._headroom = MAX_INTERVAL_S, 0
            if rate > 0:
                margin = cap_margin(self.max_len)
                room = max(margin, self.max_len + margin - state.length)
                self.interval_s = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, room / 4 / rate))
                self._headroom = min(margin // 2, int(rate * self.interval_s))
        self._added = (now, state.entries_added)

    async def _trim(
        self, groups: list[GroupPosition]
    ) -> tuple[StreamState, dict[str, StreamId | None], dict[str, StreamId | None]]:
        """Below the slowest group (approximately: whole nodes), then to the cap (exactly; less
        what is expected before the next round, while the stream grows). Returns the stream's
        state after, and the entry each group has next, before the trim and after it."""
        floor = min(group.has for group in groups)
        nexts = [
            ("XRANGE", self.stream, f"({group.last_delivered}", "+", "COUNT", 1) for group in groups
        ]
        commands: list[tuple[Any, ...]] = list(nexts)
        if floor.ms > 0:
            commands.append(("XTRIM", self.stream, "MINID", "~", str(floor)))
        commands.append(("XTRIM", self.stream, "MAXLEN", "=", self.max_len - self._headroom))
        commands += [("XINFO", "STREAM", self.stream), *nexts]
        replies = await transaction(self.client, commands)
        count = len(groups)
        before, after = _next_ids(groups, replies[:count]), _next_ids(groups, replies[-count:])
        return self._remember(StreamState.parse(_fields(replies[-count - 1]))), before, after

    def _remember(self, state: StreamState) -> StreamState:
        """Redis 7.0 forgets ``max-deleted-entry-id`` in an AOF rewrite and restart: what this
        gateway saw before still counts."""
        self._max_deleted = max(self._max_deleted, state.max_deleted)
        state.max_deleted = self._max_deleted
        return state

    async def _report(
        self,
        groups: list[GroupPosition],
        state: StreamState,
        seen: dict[str, StreamId | None],
        *,
        since_last_round: bool,
    ) -> None:
        """Report, once, what each group lost; ``seen``: per group, an entry known to have
        existed after its position (its next entry at the end of the last round, or just before
        this round's trim)."""
        reported = await self._reported_marks()
        for group in groups:
            has = group.received
            if since_last_round:
                has = min(has, self._had.get(group.name, has))
            lost = _lost_range(has, group, state, seen.get(group.name))
            if lost is None:
                continue
            after, upto = max(lost[0], reported.get(group.name, lost[0])), lost[1]
            if upto <= after:
                continue
            reported[group.name] = upto
            log.log(
                self._level(group.name),
                "stream %s: entries after %s up to %s left the stream before group %s had them "
                "(cap %d, or deleted by a producer)",
                self.stream,
                after,
                upto,
                group.name,
                self.max_len,
            )
            if self.reported_key is not None:
                await self.client.hset(self.reported_key, f"{self.stream}|{group.name}", str(upto))
            if self.on_gap is not None:
                await self.on_gap(group.name, str(after), str(upto))

    def _level(self, group: str) -> int:
        """WARNING at most every :data:`WARN_EVERY_S` per group (a peer down at the cap loses
        entries every round), DEBUG in between."""
        now = time.monotonic()
        if now - self._warned.get(group, -WARN_EVERY_S) < WARN_EVERY_S:
            return logging.DEBUG
        self._warned[group] = now
        return logging.WARNING

    async def _reported_marks(self) -> dict[str, StreamId]:
        if self._reported is None:
            self._reported = {}
            if self.reported_key is not None:
                saved: dict[Any, Any] = await self.client.hgetall(self.reported_key)
                prefix = f"{self.stream}|".encode()
                for field, value in saved.items():
                    if field.startswith(prefix):
                        self._reported[field[len(prefix) :].decode()] = StreamId.parse(value)
        return self._reported

    async def _unread(self, group: GroupPosition, state: StreamState) -> int:
        """Entries after the group's last-delivered ID (:func:`unread`; counted with a bounded
        XRANGE when the counters cannot be trusted)."""
        known = unread(group, state)
        if known is not None:
            return known
        entries: Any = await self.client.xrange(
            self.stream, min=f"({group.last_delivered}", count=BACKLOG_COUNT_LIMIT
        )
        return len(entries) if len(entries) < BACKLOG_COUNT_LIMIT else state.length


def unread(group: GroupPosition, state: StreamState) -> int | None:
    """Entries after the group's last-delivered ID, from stream IDs rather than ``XINFO GROUPS``
    lag (which Redis 7.0 leaves wrong after an AOF rewrite and restart): 0 once the group has
    read the last entry, the whole stream while it is behind the first; in between, entries
    added minus entries read when that fits the stream, else None (only a count can tell)."""
    if state.first is None or group.last_delivered >= state.last_generated:
        return 0
    if group.last_delivered < state.first:
        return state.length
    added, read = state.entries_added, group.entries_read
    if added is not None and read is not None and 0 <= added - read <= state.length:
        return added - read
    return None


def _stream_shape(state: StreamState) -> tuple[Any, ...]:
    """What tells whether anything was added to or deleted from the stream."""
    return (
        state.length,
        state.first,
        state.last_generated,
        state.max_deleted,
        state.entries_added,
    )


def _settled(state: StreamState, groups: list[GroupPosition]) -> tuple[Any, ...]:
    """What a round's trim and loss reports depend on: if none of it changed since the last
    trim, this round would neither trim nor report anything."""
    return (
        *_stream_shape(state),
        [(g.name, g.last_delivered, g.pending, g.entries_read, g.has) for g in groups],
    )


def _fields(reply: dict[bytes, Any] | list[Any]) -> dict[str, Any]:
    """A raw ``XINFO`` reply as the dict redis-py would make of it (the parser gives a map, or
    names and values in turn)."""
    pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    return {name.decode(): value for name, value in pairs}


def _next_ids(groups: list[GroupPosition], replies: list[Any]) -> dict[str, StreamId | None]:
    """Per group, the first entry after its last-delivered ID (XRANGE … COUNT 1 replies)."""
    return {
        group.name: StreamId.parse(entries[0][0]) if entries else None
        for group, entries in zip(groups, replies, strict=True)
    }


def _lost_range(
    has: StreamId, group: GroupPosition, state: StreamState, seen: StreamId | None
) -> tuple[StreamId, StreamId] | None:
    """(after, upto]: the entries after ``has`` that are no longer in the stream.

    Everything before the first entry is gone; whether any such entry came after ``has`` is
    known from an entry seen there (``seen``) or from the counters (more entries unread than
    the stream holds)."""
    upto = state.max_deleted if state.max_deleted > has else None
    gone = state.gone_upto
    if gone > has:
        added, read = state.entries_added, group.entries_read
        if (seen is not None and has < seen <= gone) or (
            added is not None and read is not None and added - read > state.length
        ):
            upto = gone if upto is None else max(upto, gone)
    return None if upto is None else (has, upto)


async def trim_stream(
    client: AsyncRedis,
    stream: str,
    *,
    max_len: int,
    on_gap: OnGap | None = None,
    groups_needed: Collection[str] = (),
) -> list[GroupPosition]:
    """One round of a :class:`StreamTrimmer` (tools and tests; the gateway keeps one per stream)."""
    trimmer = StreamTrimmer(
        client, stream, max_len=max_len, on_gap=on_gap, groups_needed=groups_needed
    )
    return await trimmer.round()


_strangers_named: set[tuple[str, str]] = set()


def _without_strangers(
    stream: str, groups: list[GroupPosition], needed: Collection[str]
) -> list[GroupPosition]:
    """The groups that hold trimming back: a group no stage reads (a peer removed from the
    config) would otherwise keep the stream at its cap for good."""
    if not needed:
        return groups
    for group in groups:
        if group.name not in needed and (stream, group.name) not in _strangers_named:
            _strangers_named.add((stream, group.name))
            log.warning(
                "consumer group %r of stream %s belongs to no configured peer: trimming no longer "
                "waits for it. If its peer is gone for good: XGROUP DESTROY %s %s",
                group.name,
                stream,
                stream,
                group.name,
            )
    return [group for group in groups if group.name in needed]
