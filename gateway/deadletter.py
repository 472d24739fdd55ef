"""The dead-letter stream: entries the gateway could not use, kept with the reason.

Each dead letter holds the original fields unchanged, plus ``dead.reason``, ``dead.stream`` (where
it came from), ``dead.id`` (its ID there) and ``dead.region``. Fix the producer, then re-add the
original fields to the stream to replay one. An invalidation refused out of a peer's envelope is
kept as ``origin`` (the peer region) and ``event`` (the invalidation as JSON).

Logging is rate-limited: a misbehaving producer can write thousands of bad entries a second, so
the first dead letter of each reason is logged at once and the rest are summed up, with their
count, at most once every :data:`LOG_INTERVAL_S` seconds. The metric counts every one.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import msgspec

from invalgw.connections import AsyncRedis
from invalgw.metrics import Metrics
from invalgw.proto import Invalidation
from invalgw.proto.entry import INVALID_ENTRY_CODES

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0
REASONS = (*INVALID_ENTRY_CODES, "bad_envelope", "handler_failed")
"""Every reason (metric label) a dead letter can have: the entry codes, an unreadable mirror
entry, and an entry a stage failed on repeatedly."""


class DeadLetter:
    __slots__ = ("code", "entry_id", "fields", "reason")

    def __init__(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str, code: str) -> None:
        self.entry_id = entry_id
        self.fields = fields
        self.reason = reason
        self.code = code


def event_letter(
    entry_id: bytes, origin: str, event: Invalidation, reason: str, code: str
) -> DeadLetter:
    """A dead letter for one invalidation of an envelope (``entry_id``: the mirror entry)."""
    fields = {b"origin": origin.encode(), b"event": msgspec.json.encode(event)}
    return DeadLetter(entry_id, fields, reason, code)


class DeadLetters:
    def __init__(
        self, client: AsyncRedis, stream: str, *, region: str, max_len: int, metrics: Metrics
    ) -> None:
        self.client = client
        self.stream = stream
        self.region = region
        self.max_len = max_len
        self.metrics = metrics
        self._unlogged: Counter[str] = Counter()
        self._last_said: dict[str, float] = {}

    async def put(self, source_stream: str, letters: Sequence[DeadLetter]) -> None:
        """Write ``letters`` (one round trip); call before acknowledging their entries."""
        if not letters:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for letter in letters:
                # every field as it was, repeated names included (StreamFields keeps them)
                pairs: list[Any] = getattr(letter.fields, "pairs", None) or [
                    item for pair in letter.fields.items() for item in pair
                ]
                pairs += ["dead.reason", letter.reason, "dead.stream", source_stream]
                pairs += ["dead.id", letter.entry_id, "dead.region", self.region]
                pipe.execute_command("XADD", self.stream, "MAXLEN", "~", self.max_len, "*", *pairs)
            await pipe.execute()
        for letter in letters:
            self.metrics.dead_letters.labels(self.region, letter.code).inc()
            self._log(source_stream, letter)

    def _log(self, source_stream: str, letter: DeadLetter) -> None:
        """The first of a reason at once, then at most one line per interval, with the count."""
        now = time.monotonic()
        last = self._last_said.get(letter.code)
        if last is not None and now - last < LOG_INTERVAL_S:
            self._unlogged[letter.code] += 1
            return
        self._last_said[letter.code] = now
        more = self._unlogged.pop(letter.code, 0)
        log.warning(
            "dead-lettered %s %s: %s%s",
            source_stream,
            letter.entry_id.decode(errors="backslashreplace"),
            letter.reason,
            f" (and {more} more {letter.code} since the last such line)" if more else "",
            extra={"stream": source_stream, "ids": [letter.entry_id], "reason": letter.code},
        )
