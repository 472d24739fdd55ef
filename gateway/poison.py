"""No single entry may stop a stage: what a handler cannot do with one entry is dead-lettered.

A stage survives Redis errors by backing off and trying again (:mod:`invalgw.stages`). Any other
error out of a handler is about the data it was given: a bug met by one odd entry, which would
fail again on every redelivery and, left alone, stop the stage and the gateway after every
restart. :class:`PoisonGuard` wraps a stage's handler: when a batch fails that way, its entries
are handled one at a time; one that fails :data:`MAX_ATTEMPTS` times in a row is dead-lettered
(code ``handler_failed``, with the error) and acknowledged, and the stage goes on.

A sender to a peer (:mod:`invalgw.forward`) reads the local stream without a handler of this
kind, so :class:`SenderGuard` does the same for it. What a sender does with the entries it read
before any I/O (parse, conflate, trace, encode the envelope) runs under :func:`preparing`, which
blames a failure there on those entries (:class:`PoisonedBatch`); a failure of the sender's I/O
code is not blamed on data. The session ends and the sender backs off and reads the stream again
from its cursor; a batch that failed :data:`MAX_ATTEMPTS` times in a row is then sent one entry at
a time; an entry that fails :data:`MAX_ATTEMPTS` times alone is dead-lettered (code
``handler_failed``, the reason naming the sender) and passed over, and the peer is told of a gap
for it: it missed that invalidation. The local apply and the other peers' senders go on meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from invalgw.connections import REDIS_ERRORS
from invalgw.deadletter import DeadLetter, DeadLetters
from invalgw.proto import StreamId
from invalgw.read import Entry, GroupReader
from invalgw.stages import Handler

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


class PoisonGuard:
    def __init__(
        self, handler: Handler, reader: GroupReader, dead_letters: DeadLetters, *, name: str
    ) -> None:
        self.handler = handler
        self.reader = reader
        self.dead_letters = dead_letters
        self.name = name

    async def __call__(self, entries: Sequence[Entry]) -> None:
        try:
            await self.handler(entries)
        except REDIS_ERRORS:
            raise
        except Exception as exc:
            log.warning(
                "%s: a batch of %d entries failed (%s: %s); handling them one by one",
                self.name,
                len(entries),
                type(exc).__name__,
                exc,
            )
            for entry in entries:
                await self._one(entry)

    async def _one(self, entry: Entry) -> None:
        failure: Exception | None = None
        for _attempt in range(MAX_ATTEMPTS):
            try:
                await self.handler([entry])
            except REDIS_ERRORS:
                raise
            except Exception as exc:
                failure = exc
            else:
                return
        entry_id, fields = entry
        reason = (
            f"{self.name} failed {MAX_ATTEMPTS} times on this entry: "
            f"{type(failure).__name__}: {failure}"
        )
        log.error("%s: entry %s: %s", self.name, entry_id.decode(errors="backslashreplace"), reason)
        await self.dead_letters.put(
            self.reader.stream, [DeadLetter(entry_id, dict(fields), reason, "handler_failed")]
        )
        await self.reader.ack([entry_id])


class PoisonedBatch(Exception):
    """A sender failed, on something other than Redis, to turn entries it read into an envelope
    (the cause is chained). Never reaches the operator: the sender retries, then dead-letters."""

    def __init__(self, entries: Sequence[Entry], cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.entries = entries
        self.cause = cause


@contextmanager
def preparing(entries: Sequence[Entry]) -> Iterator[None]:
    """Blame a failure inside (code that only works on ``entries``, no I/O) on ``entries``."""
    try:
        yield
    except REDIS_ERRORS:
        raise
    except Exception as exc:
        if not entries:  # nothing read to blame: not about the data
            raise
        raise PoisonedBatch(entries, exc) from exc


class SenderGuard:
    """A sender's entries that fail to prepare: the batch is read and tried again, then its
    entries one at a time; one failing alone :data:`MAX_ATTEMPTS` times is dead-lettered and
    passed over (see the module)."""

    def __init__(self, dead_letters: DeadLetters | None, *, name: str, stream: str) -> None:
        self.dead_letters = dead_letters
        self.name = name
        self.stream = stream
        self.reset()

    def reset(self) -> None:
        """Forget every failure (the stream was lost: its entries are gone)."""
        self._failing: bytes | None = None
        """The first entry of the batch that failed last."""
        self._attempts = 0
        self._one_by_one_until: StreamId | None = None
        self.skipped: set[bytes] = set()
        """Entries dead-lettered, the sender's position not yet past them."""
        self.to_bury: tuple[Entry, str] | None = None
        """An entry to dead-letter (and its reason), done by the sender's next session."""

    def count(self, position: StreamId, count: int) -> int:
        """How many entries to read after ``position``: one at a time through a failed batch."""
        if self.skipped:
            self.skipped = {i for i in self.skipped if StreamId.parse(i) > position}
        if self._one_by_one_until is not None and position < self._one_by_one_until:
            return 1
        self._one_by_one_until = None
        return count

    def skips(self, entries: Sequence[Entry]) -> bool:
        """Whether ``entries`` hold one that was dead-lettered."""
        return bool(self.skipped) and any(entry[0] in self.skipped for entry in entries)

    def kept(self, entries: Sequence[Entry]) -> Sequence[Entry]:
        """``entries`` but the dead-lettered ones."""
        if not self.skipped:
            return entries
        return [entry for entry in entries if entry[0] not in self.skipped]

    def failed(self, batch: PoisonedBatch) -> int:
        """Count a failure of ``batch``: after :data:`MAX_ATTEMPTS` in a row, go one by one, or
        (a single entry) mark it :attr:`to_bury`. Returns the attempts made so far on what is
        tried next (0: something new, at once)."""
        entries = batch.entries
        first = entries[0][0]
        self._attempts = self._attempts + 1 if first == self._failing else 1
        self._failing = first
        log.warning(
            "%s: preparing %d entries from %s failed (attempt %d of %d): %s",
            self.name,
            len(entries),
            first.decode(errors="backslashreplace"),
            self._attempts,
            MAX_ATTEMPTS,
            batch,
            exc_info=batch.cause if self._attempts == 1 else None,
        )
        if self._attempts < MAX_ATTEMPTS:
            return self._attempts
        self._failing, self._attempts = None, 0
        if len(entries) > 1:
            self._one_by_one_until = StreamId.parse(entries[-1][0])
            return 0
        reason = f"{self.name} failed {MAX_ATTEMPTS} times on this entry: {batch}"
        log.error("%s: entry %s: %s", self.name, first.decode(errors="backslashreplace"), reason)
        self.to_bury = (entries[0], reason)
        return 0

    async def bury(self) -> bytes | None:
        """Dead-letter the entry :meth:`failed` gave up on; returns its ID (None: nothing to do)."""
        if self.to_bury is None:
            return None
        (entry_id, fields), reason = self.to_bury
        if self.dead_letters is not None:
            letter = DeadLetter(entry_id, dict(fields), reason, "handler_failed")
            await self.dead_letters.put(self.stream, [letter])
        self.skipped.add(entry_id)
        self.to_bury = None
        return entry_id
