"""Mirror apply: invalidations from a peer region take effect in this region's cache.

Reads the mirror stream one origin's forwarder writes into this region's Redis. Mirror entries
are applied, never forwarded again, so invalidations cannot loop. Every envelope names the origin's
epoch and the ID it follows; a change of epoch or a jump past what was applied is a gap, recorded.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence

import msgspec

from invalgw.apply import AppliedRecord, apply_and_ack
from invalgw.cache import Cache
from invalgw.clock import ServerClock
from invalgw.deadletter import DeadLetter, DeadLetters, event_letter
from invalgw.effects import plan_batch
from invalgw.gaps import Gaps
from invalgw.lag import LinkStatus
from invalgw.metrics import Metrics
from invalgw.policy import Resolver
from invalgw.proto import (
    Batch,
    Heartbeat,
    Invalidation,
    InvalidEntry,
    Limits,
    StreamId,
    check_invalidation,
    decode_envelope,
)
from invalgw.proto.envelope import ENVELOPE_FIELD
from invalgw.read import Entry, GroupReader
from invalgw.scanner import ScanJob, Scanner
from invalgw.tracing import InvalidationTracer

log = logging.getLogger(__name__)

_STREAM_ID = re.compile(r"[0-9]+-[0-9]+")


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
        limits: Limits,
        metrics: Metrics,
        origin_clock: ServerClock,
        local_clock: ServerClock,
        status: LinkStatus,
        status_key: str,
        resolver: Resolver,
        scanner: Scanner,
        tracer: InvalidationTracer,
    ) -> None:
        self.region = region
        self.resolver = resolver
        self.scanner = scanner
        self.origin = origin
        self.reader = reader
        self.cache = cache
        self.dead_letters = dead_letters
        self.gaps = gaps
        self.limits = limits
        """This region's own limits and names: every event of an envelope is checked with them."""
        self.origin_clock = origin_clock
        self.local_clock = local_clock
        self.status = status
        self.status_key = status_key
        self.record = AppliedRecord(
            region=region,
            origin=origin,
            stage="mirror",
            stream=reader.stream,
            metrics=metrics,
            tracer=tracer,
            status=status,
        )

    def origin_now_ms(self) -> float:
        """The origin Redis's clock now; this region's clock until a TIME sample of it arrived."""
        if self.origin_clock.synced:
            return self.origin_clock.now_ms()
        return self.local_clock.now_ms()

    async def __call__(self, entries: Sequence[Entry]) -> None:
        # What this batch changes in the status counts only once it is applied and acknowledged:
        # if the cache cannot be reached and the mirror is then lost, the gap must still show.
        status = msgspec.structs.replace(self.status)
        batches: list[Batch] = []
        scans: dict[bytes, list[Invalidation]] = {}
        dead: list[DeadLetter] = []
        gaps: list[Gap] = []
        for entry_id, fields in entries:
            if not fields:
                log.info(
                    "mirror entry %s from %s was deleted before it was applied; the next "
                    "envelope tells whether invalidations were lost",
                    entry_id.decode(),
                    self.origin,
                )
                continue
            try:
                envelope = decode_envelope(fields[ENVELOPE_FIELD])
                _check_ids(envelope)
            except (KeyError, ValueError, msgspec.DecodeError) as exc:
                reason = f"mirror entry from {self.origin} is not an envelope: {exc}"
                dead.append(DeadLetter(entry_id, fields, reason, "bad_envelope"))
                continue
            if envelope.origin != self.origin:
                reason = f"envelope from {envelope.origin!r} in the mirror of {self.origin!r}"
                dead.append(DeadLetter(entry_id, fields, reason, "bad_envelope"))
                continue
            gaps += _continuity(status, envelope)
            status.heartbeat_ms = max(status.heartbeat_ms, envelope.sent_ms)
            if isinstance(envelope, Batch):
                envelope = self._screened(entry_id, envelope, dead)
                batches.append(envelope)
                patterns = [event for event in envelope.events if event.pattern is not None]
                if patterns:
                    scans[entry_id] = patterns
        await self.dead_letters.put(self.reader.stream, dead)
        events = [event for batch in batches for event in batch.events]
        plan = plan_batch(events, self.origin, self.resolver)
        started_ns = time.time_ns()
        for reason, after, upto in gaps:
            status.gaps += 1
            await self.gaps.record(self.origin, reason, after=after, upto=upto)
        for entry_id, patterns in scans.items():  # acknowledged once every walk is done
            self.reader.hold(entry_id)
            done = self._ack_after(entry_id, len(patterns))
            for event in patterns:
                self.scanner.submit(ScanJob(event, self.origin, done))
        acked = [entry_id for entry_id, _ in entries if entry_id not in scans]
        removed = await apply_and_ack(self.cache, self.reader, acked, plan, self.status_key, status)
        for name in ("epoch", "last_id", "heartbeat_ms", "gaps"):
            setattr(self.status, name, getattr(status, name))
        self.record(events, removed, started_ns, self.origin_now_ms())

    def _screened(self, entry_id: bytes, batch: Batch, dead: list[DeadLetter]) -> Batch:
        """``batch`` without the events this region refuses (each one added to ``dead``): an
        envelope can do no more here than a valid entry of a local producer could."""
        kept: list[Invalidation] = []
        for event in batch.events:
            try:
                check_invalidation(event, self.limits)
            except InvalidEntry as exc:
                reason = f"invalidation {event.id} from {self.origin}: {exc.reason}"
                dead.append(event_letter(entry_id, self.origin, event, reason, exc.code))
            else:
                kept.append(event)
        if len(kept) == len(batch.events):
            return batch
        return msgspec.structs.replace(batch, events=kept)

    def _ack_after(self, entry_id: bytes, walks: int) -> Callable[[], Awaitable[None]]:
        """A callback that acknowledges ``entry_id`` when called for the ``walks``-th time."""
        remaining = walks

        async def done() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                await self.reader.ack([entry_id])

        return done


Gap = tuple[str, str, str]
"""(reason, after, upto): invalidations in (after, upto] from the origin may be missing."""


def _continuity(status: LinkStatus, envelope: Batch | Heartbeat) -> list[Gap]:
    """Advance ``status`` past ``envelope``; the gaps it reveals (new epoch, trimmed, lost)."""
    gaps: list[Gap] = []
    if status.epoch and envelope.epoch != status.epoch:
        gaps.append(("the origin lost its stream history (new epoch)", status.last_id, "unknown"))
        status.last_id = "0-0"
    status.epoch = envelope.epoch
    applied = StreamId.parse(status.last_id)
    if isinstance(envelope, Batch):
        if envelope.gap_from is not None and envelope.gap_to is not None:
            gaps.append(
                (
                    "the origin lost entries before it could send them (trimmed, or deleted)",
                    envelope.gap_from,
                    envelope.gap_to,
                )
            )
        if StreamId.parse(envelope.prev) > applied:
            gaps.append(
                ("mirror entries were lost before they were applied", status.last_id, envelope.prev)
            )
        if envelope.events and StreamId.parse(envelope.events[-1].id) > applied:
            status.last_id = envelope.events[-1].id
    elif StreamId.parse(envelope.last) > applied:
        gaps.append(
            ("mirror entries were lost before they were applied", status.last_id, envelope.last)
        )
        status.last_id = envelope.last
    return gaps


def _check_ids(envelope: Batch | Heartbeat) -> None:
    """Raise ``ValueError`` if a stream ID in ``envelope`` is not ``<digits>-<digits>``."""
    if isinstance(envelope, Heartbeat):
        ids = [envelope.last]
    else:
        ids = [envelope.prev, *(event.id for event in envelope.events)]
        ids += [bound for bound in (envelope.gap_from, envelope.gap_to) if bound is not None]
    for stream_id in ids:
        if _STREAM_ID.fullmatch(stream_id) is None:
            raise ValueError(f"not a stream ID: {stream_id!r}")
