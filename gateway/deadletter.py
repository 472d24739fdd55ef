"""The dead-letter stream: entries the gateway could not use, kept with the reason.

Each dead letter holds the original fields unchanged, plus ``dead.reason``, ``dead.stream`` (where
it came from), ``dead.id`` (its ID there) and ``dead.region``. Fix the producer, then re-add the
original fields to the stream to replay one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from invalgw.connections import AsyncRedis
from invalgw.metrics import Metrics

log = logging.getLogger(__name__)


class DeadLetter:
    __slots__ = ("code", "entry_id", "fields", "reason")

    def __init__(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str, code: str) -> None:
        self.entry_id = entry_id
        self.fields = fields
        self.reason = reason
        self.code = code


class DeadLetters:
    def __init__(
        self, client: AsyncRedis, stream: str, *, region: str, max_len: int, metrics: Metrics
    ) -> None:
        self.client = client
        self.stream = stream
        self.region = region
        self.max_len = max_len
        self.metrics = metrics

    async def put(self, source_stream: str, letters: Sequence[DeadLetter]) -> None:
        """Write ``letters`` (one round trip); call before acknowledging their entries."""
        if not letters:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for letter in letters:
                fields: dict[Any, Any] = dict(letter.fields)
                fields.update(
                    {
                        "dead.reason": letter.reason,
                        "dead.stream": source_stream,
                        "dead.id": letter.entry_id,
                        "dead.region": self.region,
                    }
                )
                pipe.xadd(self.stream, fields, maxlen=self.max_len, approximate=True)
            await pipe.execute()
        for letter in letters:
            self.metrics.dead_letters.labels(self.region, letter.code).inc()
            log.warning(
                "dead-lettered %s %s: %s",
                source_stream,
                letter.entry_id.decode(),
                letter.reason,
                extra={"stream": source_stream, "ids": [letter.entry_id], "reason": letter.code},
            )
