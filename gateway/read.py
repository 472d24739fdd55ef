"""One consumer group of one stream, read at-least-once.

A :class:`GroupReader` hands out this consumer's pending entries first (left over by a crash or a
failed batch), then new ones. It recreates its group when Redis lost it (NOGROUP), and takes over
entries of consumers that died (XAUTOCLAIM). Entries are acknowledged only by the caller, after
their effect.

The reader's client must not retry on its own: a read whose reply was lost has still moved entries
into this consumer's pending list, and only a rewind to the pending list keeps them in order.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import redis

from invalgw.connections import AsyncRedis, Lane, read_group

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry: its ID and its fields (empty when the entry was deleted while pending)."""


class GroupReader:
    def __init__(
        self,
        client: AsyncRedis,
        stream: str,
        group: str,
        consumer: str,
        *,
        count: int,
        block_ms: int,
        linger_ms: int = 0,
        on_recreated: Callable[[], Awaitable[None]] | None = None,
        on_read: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.lane = Lane(client)
        """The connection the stage reads and acknowledges its batches on (closed with it)."""
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.count = count
        self.block_ms = block_ms
        self.linger_ms = linger_ms
        """After a small batch of new entries, wait this long before the next read, so that at
        low rates one read (and everything each batch costs downstream) carries several entries."""
        self._linger = False
        self._on_recreated = on_recreated
        self._on_read = on_read
        self._cursor = b"0"
        self._held: set[bytes] = set()
        """Entries left pending on purpose (a pattern walk in progress): not handed out again."""
        self._last_new: bytes | None = None
        self.after: bytes | None = None
        """The entry the last batch read directly follows in the stream, when it was a read of new
        entries following the previous one; None otherwise (pending entries, or the first read)."""
        self.last_claimed: list[bytes] = []
        """IDs of the entries the last :meth:`claim` took over."""

    async def ensure_group(self) -> bool:
        """Create the group (and the stream) if missing; True if it had to be created.

        New groups start at ID 0, so entries written before the gateway first ran are not skipped.
        """
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    def hold(self, entry_id: bytes) -> None:
        """Keep ``entry_id`` pending without handing it out again, until :meth:`ack`."""
        self._held.add(entry_id)

    def rewind(self) -> None:
        """Read this consumer's pending entries again before new ones (after a failed batch)."""
        self._cursor = b"0"

    async def read(self) -> list[Entry]:
        """The next batch: pending entries first, then new ones (blocking up to ``block_ms``)."""
        pending = self._cursor != b">"
        if self._linger and not pending:
            await anyio.sleep(self.linger_ms / 1000)
        try:
            entries = await read_group(
                self.client,
                self.group,
                self.consumer,
                self.stream,
                self._cursor,
                count=self.count,
                block_ms=None if pending else self.block_ms,
                lane=self.lane,
            )
        except redis.ResponseError as exc:
            if "UNBLOCKED" in str(exc):  # the stream was deleted while we waited on it
                return []
            if "NOGROUP" not in str(exc):
                raise
            await self.recreate()
            return []
        if self._on_read is not None:
            self._on_read()
        self.after = None
        if not pending and entries:
            self.after, self._last_new = self._last_new, entries[-1][0]
        # a batch under a quarter full: entries trickle in, so let a few gather first; an empty
        # read (idle) or a fuller batch reads again at once
        self._linger = self.linger_ms > 0 and 0 < len(entries) < max(2, self.count // 4)
        if pending:
            self._cursor = entries[-1][0] if entries else b">"
            if self._held:
                entries = [entry for entry in entries if entry[0] not in self._held]
        return entries

    async def recreate(self) -> None:
        """Create the group again (it was lost), from the stream's start; counted."""
        log.warning(
            "consumer group %r of stream %r is gone (Redis restarted without persistence, or the "
            "stream was deleted); creating it again",
            self.group,
            self.stream,
        )
        await self.ensure_group()
        self.rewind()
        self._last_new = None
        self._held.clear()  # the pending list went with the group
        if self._on_recreated is not None:
            await self._on_recreated()

    async def claim(self, min_idle_ms: int) -> tuple[int, list[bytes]]:
        """Take over entries idle at least ``min_idle_ms`` from any consumer of the group.

        Returns how many were claimed and the IDs of pending entries whose data was already
        deleted from the stream (Redis drops those from the pending list: they are lost).
        The claimed entries are read next, through the pending list, in ID order. Entries this
        reader holds (:meth:`hold`) are idle on purpose: they are neither counted nor re-read.
        """
        start: bytes | str = "0-0"
        claimed = 0
        deleted: list[bytes] = []
        self.last_claimed = []
        while True:
            try:
                reply: Any = await self.client.xautoclaim(
                    self.stream, self.group, self.consumer, min_idle_ms, start, count=self.count
                )
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.recreate()
                return claimed, deleted
            start, entries, *rest = reply
            new = [entry_id for entry_id, _ in entries if entry_id not in self._held]
            claimed += len(new)
            self.last_claimed += new
            if rest:
                deleted += rest[0]
            if start == b"0-0":
                break
        if claimed:
            self.rewind()
        return claimed, deleted

    async def ack(self, ids: Sequence[bytes]) -> None:
        if ids:
            await self.client.xack(self.stream, self.group, *ids)
            self._held.difference_update(ids)

    def release(self, ids: Sequence[bytes]) -> None:
        """Forget that ``ids`` were held (the caller acknowledged them itself)."""
        self._held.difference_update(ids)
