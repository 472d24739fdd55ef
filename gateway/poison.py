"""No single entry may stop a stage: what a handler cannot do with one entry is dead-lettered.

A stage survives Redis errors by backing off and trying again (:mod:`invalgw.stages`). Any other
error out of a handler is about the data it was given: a bug met by one odd entry, which would
fail again on every redelivery and, left alone, stop the stage and the gateway after every
restart. :class:`PoisonGuard` wraps a stage's handler: when a batch fails that way, its entries
are handled one at a time; one that fails :data:`MAX_ATTEMPTS` times in a row is dead-lettered
(code ``handler_failed``, with the error) and acknowledged, and the stage goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from invalgw.connections import REDIS_ERRORS
from invalgw.deadletter import DeadLetter, DeadLetters
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
