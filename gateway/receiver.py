"""Mirror apply: invalidations from a peer region take effect in this region's cache.

Reads the mirror stream one origin's forwarder writes into this region's Redis. Mirror entries
are applied, never forwarded again, so invalidations cannot loop. Every envelope names the origin's
epoch and the ID it follows; a change of epoch or a jump past what was applied is a gap, recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec

from gateway.applier import apply_and_ack
from gateway.cache import Cache
from gateway.clock import ServerClock
from gateway.deadletter import DeadLetter, DeadLetters
from gateway.gaps import Gaps
from gateway.groups import Entry, GroupReader
from gateway.lag import LagWindow, LinkStatus, lag_counts
from gateway.metrics import Metrics
from proto import Batch, Heartbeat, StreamId, decode_envelope
from proto.envelope import ENVELOPE_FIELD

log = logging.getLogger(__name__)


class MirrorApplier:
    """Handler of the ``apply`` group on the mirror stream from one origin."""

    def __init__(
        self,
        *,
        region: str,
        origin: str,
        reader: GroupReader,
        cache: Cache,
        dead_letters: DeadLetters,
        gaps: Gaps,
        metrics: Metrics,
        origin_clock: ServerClock,
        local_clock: ServerClock,
        status: LinkStatus,
        status_key: str,
    ) -> None:
        self.region = region
        self.origin = origin
        self.reader = reader
        self.cache = cache
        self.dead_letters = dead_letters
        self.gaps = gaps
        self.origin_clock = origin_clock
        self.local_clock = local_clock
        self.status = status
        self.status_key = status_key
        self.window = LagWindow()
        self._lag = metrics.lag.labels(origin, region)
        self._applied = metrics.applied.labels(region, origin, "unlink")
        self._removed = metrics.keys_removed.labels(region, origin)
        self._batch = metrics.batch_size.labels(region, "mirror")

    def origin_now_ms(self) -> float:
        """The origin Redis's clock now; this region's clock until a TIME sample of it arrived."""
        if self.origin_clock.synced:
            return self.origin_clock.now_ms()
        return self.local_clock.now_ms()

    async def __call__(self, entries: Sequence[Entry]) -> None:
        batches: list[Batch] = []
        dead: list[DeadLetter] = []
        for entry_id, fields in entries:
            try:
                envelope = decode_envelope(fields[ENVELOPE_FIELD])
            except (KeyError, msgspec.DecodeError) as exc:
                reason = f"mirror entry from {self.origin} is not an envelope: {exc}"
                dead.append(DeadLetter(entry_id, fields, reason, "bad_envelope"))
                continue
            if envelope.origin != self.origin:
                reason = f"envelope from {envelope.origin!r} in the mirror of {self.origin!r}"
                dead.append(DeadLetter(entry_id, fields, reason, "bad_envelope"))
                continue
            await self._check_continuity(envelope)
            self.status.heartbeat_ms = max(self.status.heartbeat_ms, envelope.sent_ms)
            if isinstance(envelope, Batch):
                batches.append(envelope)
        await self.dead_letters.put(self.reader.stream, dead)
        keys = [key for batch in batches for event in batch.events for key in event.keys]
        removed = await apply_and_ack(
            self.cache, self.reader, entries, keys, self.status_key, self.status
        )
        self._record(batches, removed)

    async def _check_continuity(self, envelope: Batch | Heartbeat) -> None:
        status = self.status
        if status.epoch and envelope.epoch != status.epoch:
            status.gaps += 1
            await self.gaps.record(
                self.origin,
                "the origin lost its stream history (new epoch)",
                after=status.last_id,
                upto="unknown",
            )
            status.last_id = "0-0"
        status.epoch = envelope.epoch
        if isinstance(envelope, Batch):
            if envelope.gap_from is not None and envelope.gap_to is not None:
                status.gaps += 1
                await self.gaps.record(
                    self.origin,
                    "the origin trimmed entries before delivering them",
                    after=envelope.gap_from,
                    upto=envelope.gap_to,
                )
            applied = StreamId.parse(status.last_id)
            if StreamId.parse(envelope.prev) > applied:
                status.gaps += 1
                await self.gaps.record(
                    self.origin,
                    "mirror entries were lost before they were applied",
                    after=status.last_id,
                    upto=envelope.prev,
                )
            if envelope.events:
                last = envelope.events[-1].id
                if StreamId.parse(last) > applied:
                    status.last_id = last
        elif StreamId.parse(envelope.last) > StreamId.parse(status.last_id):
            status.gaps += 1
            await self.gaps.record(
                self.origin,
                "mirror entries were lost before they were applied",
                after=status.last_id,
                upto=envelope.last,
            )
            status.last_id = envelope.last

    def _record(self, batches: list[Batch], removed: int) -> None:
        count = sum(len(batch.events) for batch in batches)
        self._batch.observe(count)
        if not count:
            return
        self._applied.inc(count)
        self._removed.inc(removed)
        self.status.applied += count
        ids = [event.id for batch in batches for event in batch.events]
        lags = lag_counts(ids, self.origin_now_ms())
        self._lag.observe_counts([(lag / 1000, count) for lag, count in lags])
        self.window.add_counts(lags)
