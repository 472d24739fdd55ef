"""A sender's durable cursor: its ``to:<peer>`` consumer group on the local stream, never read.

The group's last-delivered ID is the last local entry the peer accepted (or already had); the
sender moves it with ``XGROUP SETID … ENTRIESREAD`` in the same round trip as the link state, so
``XINFO GROUPS`` shows each peer's lag, and trimming (which follows the slowest group) never
passes an entry a restarted sender would still send. Entries left pending in the group (by a
consumer that died, or by an older gateway that read the group) are taken over and acknowledged
once the cursor passed them; at start the cursor goes back to just before the first of them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis
from prometheus_client import Counter

from invalgw.connections import AsyncRedis
from invalgw.functions import SAVE_CURSOR, Fence, call_fenced
from invalgw.proto import StreamId
from invalgw.proto.streamid import ZERO
from invalgw.read import GroupReader

log = logging.getLogger(__name__)


def _group_lost(exc: redis.ResponseError) -> bool:
    """The consumer group, or the whole stream, is gone (Redis restarted empty, key deleted)."""
    text = str(exc)
    return "NOGROUP" in text or "requires the key to exist" in text


class SenderCursor:
    def __init__(
        self,
        *,
        name: str,
        reader: GroupReader,
        local: AsyncRedis,
        link_key: str,
        fence: Fence | None,
        reclaimed: Counter,
        on_lost: Callable[[list[bytes]], Awaitable[None]],
    ) -> None:
        self.name = name
        self.reader = reader
        self.local = local
        self.link_key = link_key
        self.fence = fence
        """The lease the cursor moves are conditional on (see :mod:`invalgw.functions`)."""
        self._reclaimed = reclaimed
        self._on_lost = on_lost
        self.position = ZERO
        """The last local stream entry the peer accepted (or had)."""
        self.entries_read = 0
        """Entries of the stream up to :attr:`position` (Redis shows the group's lag from it)."""
        self._claimed: list[bytes] = []
        """Entries taken over from dead consumers' pending lists, acknowledged once passed."""

    async def load(self) -> None:
        """Create the group if missing, take over its pending entries, and read the cursor."""
        if await self.reader.ensure_group():
            log.info("%s: created consumer group %r", self.name, self.reader.group)
        await self.claim(0)
        stream, group = self.reader.stream, self.reader.group
        infos: list[dict[str, Any]] = await self.local.xinfo_groups(stream)
        info = next((i for i in infos if i["name"] == group.encode()), None)
        if info is None:
            await self.recreate()
            return
        position = StreamId.parse(info["last-delivered-id"])
        entries_read = info.get("entries-read")
        if entries_read is None:
            stream_info: dict[str, Any] = await self.local.xinfo_stream(stream)
            added, lag = int(stream_info["entries-added"]), info.get("lag")
            entries_read = added - int(lag) if lag is not None else added - stream_info["length"]
        entries_read = max(0, int(entries_read))
        if self._claimed:
            # Sent again from the first of them; they stay pending, so that trimming sees they
            # were delivered (one deleted meanwhile is found by the next claim, exactly), and are
            # acknowledged once the cursor passes them (see save).
            first = min(StreamId.parse(entry_id) for entry_id in self._claimed).previous()
            if first < position:
                position, entries_read = first, max(0, entries_read - len(self._claimed))
                await self.local.xgroup_setid(
                    stream, group, str(position), entries_read=entries_read
                )
        self.position, self.entries_read = position, entries_read

    async def claim(self, min_idle_ms: int) -> None:
        """Take over the group's entries left pending by dead consumers (idle ``min_idle_ms``).

        The sender never reads its group, so pending entries come from a consumer that died (or
        an older gateway): entries up to the cursor were delivered since, the others will be.
        Pending entries whose data was deleted are a gap for the peer.
        """
        claimed, lost = await self.reader.claim(min_idle_ms)
        if claimed:
            log.info("%s: took over %d pending entries", self.name, claimed)
            self._reclaimed.inc(claimed)
            for entry_id in self.reader.last_claimed:
                self.reader.hold(entry_id)
            self._claimed += self.reader.last_claimed
        if lost:
            log.warning(
                "%s: %d pending entries were deleted before they were sent (%s … %s)",
                self.name,
                len(lost),
                lost[0].decode(),
                lost[-1].decode(),
            )
            await self._on_lost(lost)

    async def save(
        self,
        *,
        state: dict[str, str],
        gap: tuple[str, str] | None,
        cursor: StreamId,
        count: int,
        ack: Sequence[bytes] = (),
    ) -> bool:
        """Save the link ``state``, clear ``gap`` (delivered) and move the cursor to ``cursor``
        (``count`` entries further), in one round trip. False if the group was lost: it was
        created again, from the stream's start."""
        cursor = max(cursor, self.position)
        entries_read = self.entries_read + count if cursor > self.position else self.entries_read
        passed = [i for i in self._claimed if StreamId.parse(i) <= cursor] if self._claimed else []
        try:
            await self._write(state, gap, cursor, entries_read, [*ack, *passed])
        except redis.ResponseError as exc:
            if not _group_lost(exc):
                raise
            await self.recreate()
            return False
        self.position, self.entries_read = cursor, entries_read
        if passed:
            done = set(passed)
            self._claimed = [i for i in self._claimed if i not in done]
            self.reader.release(passed)
        return True

    async def _write(
        self,
        state: dict[str, str],
        gap: tuple[str, str] | None,
        cursor: StreamId,
        entries_read: int,
        ack: Sequence[bytes],
    ) -> None:
        fields = [item for pair in state.items() for item in pair]
        await call_fenced(
            self.local,
            SAVE_CURSOR,
            self.fence,
            [self.reader.stream, self.link_key],
            [
                self.reader.group,
                str(cursor),
                entries_read,
                *(gap or ("", "")),  # only the gap just delivered: one noted meanwhile stays
                len(state),
                *fields,
                *ack,
            ],
        )

    async def recreate(self) -> None:
        """The group is gone: create it again from the stream's start, counted (the reader's hook
        also starts a new epoch, once, whichever stage of the stream saw the loss first)."""
        await self.reader.recreate()
        self._claimed = []
        self.position, self.entries_read = ZERO, 0
