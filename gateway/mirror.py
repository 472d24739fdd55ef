"""Mirror apply: invalidations from a peer region take effect in this region's cache.

Reads the mirror stream one origin's forwarder writes into this region's Redis. Mirror entries
are applied, never forwarded again, so invalidations cannot loop. Every envelope names the origin's
epoch and the ID it follows; a change of epoch or a jump past what was applied is a gap, recorded.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import redis

from invalgw.apply import AppliedRecord, ApplyContext, BatchWork, apply_and_ack
from invalgw.clock import ServerClock
from invalgw.deadletter import DeadLetter, event_letter
from invalgw.effects import Plan, plan_batch
from invalgw.lag import LinkStatus
from invalgw.proto import (
    Batch,
    Heartbeat,
    Invalidation,
    InvalidEntry,
    StreamId,
    check_invalidation,
    decode_envelope,
    plainly_valid,
)
from invalgw.proto.envelope import ENVELOPE_FIELD
from invalgw.read import Entry, GroupReader

log = logging.getLogger(__name__)

_STREAM_ID = re.compile(r"[0-9]+-[0-9]+")
_STREAM_IDS = re.compile(r"[0-9]+-[0-9]+(?:,[0-9]+-[0-9]+)*")
"""Stream IDs joined with commas."""

SENT_AHEAD_MS = 5_000
"""How far past the origin's clock (as this region samples it) an envelope's ``sent_ms`` is
believed; a later one, forged or from a broken clock, counts as that much: it cannot hold a
link's heartbeat age at 0 after the link went silent."""


class MirrorApplier:
    """Handler of the ``apply`` group on the mirror stream from one origin."""

    def __init__(
        self,
        ctx: ApplyContext,
        *,
        origin: str,
        reader: GroupReader,
        origin_clock: ServerClock,
        local_clock: ServerClock,
        status: LinkStatus,
    ) -> None:
        self.ctx = ctx
        self.origin = origin
        self.reader = reader
        self.origin_clock = origin_clock
        self.local_clock = local_clock
        self.status = status
        self.record = AppliedRecord(
            ctx, origin=origin, stage="mirror", stream=reader.stream, status=status
        )
        self._unsure: tuple[LinkStatus, list[bytes]] | None = None
        """A batch whose acknowledgement failed: its status, and the entries it acknowledged."""

    def origin_now_ms(self) -> float:
        """The origin Redis's clock now; this region's clock until a TIME sample of it arrived."""
        if self.origin_clock.synced:
            return self.origin_clock.now_ms()
        return self.local_clock.now_ms()

    async def __call__(self, entries: Sequence[Entry]) -> None:
        await self._settle_unsure()
        # What this batch changes in the status counts only once it is applied and acknowledged:
        # if the cache cannot be reached and the mirror is then lost, the gap must still show.
        status = msgspec.structs.replace(self.status)
        envelopes = await self._envelopes(entries)
        work = BatchWork([entry_id for entry_id, _ in entries], Plan())
        events: list[Invalidation] = []
        owners: list[tuple[bytes, list[Invalidation]]] = []
        work.events = lambda: owners
        latest_ms = int(self.origin_now_ms()) + SENT_AHEAD_MS
        for entry_id, envelope, kept in envelopes:
            # Continuity follows the envelope as sent, whatever this region refused of it.
            for reason, after, upto in _continuity(status, envelope):
                status.gaps += 1
                await self.ctx.gaps.record(self.origin, reason, after=after, upto=upto)
            sent_ms = min(envelope.sent_ms, latest_ms)
            status.heartbeat_ms = max(status.heartbeat_ms, sent_ms)
            if kept:
                events += kept
                owners.append((entry_id, kept))
        work.plan = plan_batch(events, self.origin, self.ctx.resolver)
        for entry_id, kept in owners if work.plan.scans else ():
            patterns = [event for event in kept if event.pattern is not None]
            if patterns:
                work.walks[entry_id] = patterns
        started_ns = time.time_ns()
        status.applied += len(events)  # saved with the acknowledgement, not a second later
        try:
            effect = apply_and_ack(self.ctx, self.reader, self.origin, work, status)
            removed = await self.record.guard(events, started_ns, effect)
        except BaseException:
            if work.acking:
                self._unsure = (status, [i for i in work.ids if i not in work.held])
            raise
        self._adopt(status)
        self.record(events, removed, started_ns, self.origin_now_ms())

    def _adopt(self, status: LinkStatus) -> None:
        for name in ("epoch", "last_id", "heartbeat_ms", "gaps", "applied"):
            setattr(self.status, name, getattr(status, name))

    async def _settle_unsure(self) -> None:
        """After a failed batch: was its acknowledgement carried out all the same (Redis went
        away after EXEC, before the reply)? Then its status holds, or the next envelope would
        look like a jump past entries that were applied (a false gap)."""
        if self._unsure is None:
            return
        status, ids = self._unsure
        pending: list[Any] = []
        if ids:
            try:
                pending = await self.reader.client.xpending_range(
                    self.reader.stream, self.reader.group, min=ids[0], max=ids[-1], count=len(ids)
                )
            except redis.ResponseError:  # the group is gone: its entries are read again
                self._unsure = None
                return
        self._unsure = None
        if not {item["message_id"] for item in pending} & set(ids):
            self._adopt(status)

    async def _envelopes(
        self, entries: Sequence[Entry]
    ) -> list[tuple[bytes, Batch | Heartbeat, list[Invalidation]]]:
        """The entries' envelopes, each with the events this region accepts of it; entries that
        are not an envelope, and refused events, are dead-lettered."""
        envelopes: list[tuple[bytes, Batch | Heartbeat, list[Invalidation]]] = []
        dead: list[DeadLetter] = []
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
            kept = self._screened(entry_id, envelope, dead) if isinstance(envelope, Batch) else []
            envelopes.append((entry_id, envelope, kept))
        await self.ctx.dead_letters.put(self.reader.stream, dead)
        return envelopes

    def _screened(
        self, entry_id: bytes, batch: Batch, dead: list[DeadLetter]
    ) -> list[Invalidation]:
        """``batch``'s events but those this region refuses (each one added to ``dead``): an
        envelope can do no more here than a valid entry of a local producer could. The limits
        and names are this region's own (``ctx.limits``), whatever the origin checked."""
        if plainly_valid(batch.events, self.ctx.limits):  # the usual batch, checked at once
            return batch.events
        kept: list[Invalidation] = []
        for event in batch.events:
            try:
                check_invalidation(event, self.ctx.limits)
            except InvalidEntry as exc:
                reason = f"invalidation {event.id} from {self.origin}: {exc.reason}"
                dead.append(event_letter(entry_id, self.origin, event, reason, exc.code))
            else:
                kept.append(event)
        return kept


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
    joined = ",".join(ids)
    # all at once: one match, and as many commas as joints (an ID holding a comma is no ID)
    if _STREAM_IDS.fullmatch(joined) is not None and joined.count(",") == len(ids) - 1:
        return
    for stream_id in ids:
        if _STREAM_ID.fullmatch(stream_id) is None:
            raise ValueError(f"not a stream ID: {stream_id!r}")
