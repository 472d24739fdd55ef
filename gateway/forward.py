"""Forwarding: invalidations written here go, batched, into each peer region's mirror stream.

One sender per peer. The local stream is read and parsed once, by the local apply, which hands
every batch to each sender through the in-memory feed (:mod:`invalgw.feed`). A sender keeps its
own durable cursor (:mod:`invalgw.cursor`), moved once the peer accepted (or already had) the
entries. A sender that falls behind (its feed queue overflowed, the peer was down, the gateway
just started) reads the stream itself from its cursor with XRANGE, then joins the feed again; so a
slow or dead peer only grows its own backlog, and trimming, which follows the slowest cursor,
never passes what a restarted sender would still send.

A batch is one envelope appended on the peer by one ``FCALL invalgw_append`` (the library of
:mod:`invalgw.functions`, which the peer's gateway loads at start); it refuses a batch whose last
origin ID the peer already holds, so a batch re-sent after a crash or a lost reply is recognised
as delivered. Envelopes wait in a window (:mod:`invalgw.window`) until the peer confirms them;
after a failure the same envelopes go again, in order.

No entry stops a sender: what fails, on something other than Redis, while a batch's entries are
turned into an envelope is tried again from the stream, then entry by entry, and an entry that
keeps failing is dead-lettered and the peer told of a gap for it
(:class:`invalgw.poison.SenderGuard`).

A drain need not wait for a peer that does not answer: a call still running
:data:`~invalgw.window.DRAIN_GRACE_S` after the drain started is abandoned; the cursor stays
before its entries, and the next gateway sends them again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import msgspec

from invalgw.apply import parse_batch
from invalgw.clock import ServerClock
from invalgw.conflate import conflate
from invalgw.connections import REDIS_ERRORS, AsyncRedis
from invalgw.cursor import SenderCursor
from invalgw.deadletter import DeadLetters
from invalgw.epoch import Epoch
from invalgw.feed import FedBatch, Feed, Subscription
from invalgw.functions import Fence, check_renewed
from invalgw.metrics import Metrics
from invalgw.names import Names
from invalgw.poison import PoisonedBatch, SenderGuard, preparing
from invalgw.proto import Batch, Heartbeat, Invalidation, Limits, StreamId, encode_envelope
from invalgw.proto.streamid import ZERO
from invalgw.read import Entry, GroupReader
from invalgw.stages import Drain, backoff_seconds, log_failure, until_ok
from invalgw.tracing import InvalidationTracer
from invalgw.window import DRAIN_GRACE_S, Outgoing, PeerWindow, Resend

log = logging.getLogger(__name__)

__all__ = ["DRAIN_GRACE_S", "FEED_BOUND", "Forwarder"]

FEED_BOUND = 64
"""Batches a sender's feed queue holds before the sender drops out and reads the stream itself."""


class BatchOut(msgspec.Struct, frozen=True, tag="batch"):
    """A :class:`~invalgw.proto.Batch` as sent: the same fields and encoding, with the events
    already encoded (once, for every peer)."""

    origin: str
    epoch: str
    prev: str
    events: msgspec.Raw
    sent_ms: int
    gap_from: str | None = None
    gap_to: str | None = None


_encoder = msgspec.msgpack.Encoder()


@dataclass
class _Saving:
    """What confirmations changed since the last save."""

    cursor: StreamId = ZERO
    count: int = 0
    gap: tuple[str, str] | None = None
    ack: list[bytes] = field(default_factory=list)

    def then(self, later: _Saving) -> _Saving:
        """This save (which failed) followed by ``later``: what the next save must do."""
        return _Saving(
            max(self.cursor, later.cursor),
            self.count + later.count,
            later.gap or self.gap,
            self.ack + later.ack,
        )


class Forwarder:
    """The sender to one peer: delivers the local stream's batches to the peer's mirror stream."""

    def __init__(
        self,
        *,
        region: str,
        peer: str,
        reader: GroupReader,
        local: AsyncRedis,
        remote: AsyncRedis,
        names: Names,
        epoch: Epoch,
        clock: ServerClock,
        metrics: Metrics,
        limits: Limits,
        mirror_max_len: int,
        heartbeat_interval_ms: int,
        drain: Drain,
        tracer: InvalidationTracer,
        feed: Feed | None = None,
        fence: Fence | None = None,
        feed_bound: int = FEED_BOUND,
        window: int = 16,
        claim_interval_ms: int = 15_000,
        claim_idle_ms: int = 60_000,
        backoff_cap_ms: int = 5000,
        on_error: Callable[[Exception], None] | None = None,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self.region = region
        self.name = f"to:{peer}"
        self.drain = drain
        self.tracer = tracer
        self.peer = peer
        self.reader = reader
        self.local = local
        self.epoch = epoch
        self.clock = clock
        self.limits = limits
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.claim_interval_ms = claim_interval_ms
        self.claim_idle_ms = claim_idle_ms
        self.backoff_cap_ms = backoff_cap_ms
        self._on_error = on_error or (lambda exc: None)
        self.guard = SenderGuard(dead_letters, name=self.name, stream=reader.stream)
        self.subscription = (feed or Feed()).subscribe(feed_bound)
        self._link_key = names.link(peer)
        self._mirror = names.mirror(region, names.partition_index)
        self.window = PeerWindow(
            region=region,
            peer=peer,
            remote=remote,
            mirror_keys=[
                names.mirror(region, names.partition_index),
                names.mirror_state(region, names.partition_index),
            ],
            mirror_max_len=mirror_max_len,
            drain=drain,
            metrics=metrics,
            size=window,
        )
        self.fence = fence
        """Sends wait while its lease is not known to be this process's (see :class:`Fence`)."""
        self.cursor = SenderCursor(
            name=self.name,
            reader=reader,
            local=local,
            link_key=self._link_key,
            fence=fence,
            reclaimed=metrics.reclaimed.labels(region, self.name),
            on_lost=self.entries_lost,
        )
        self.last = "0-0"
        """Origin ID of the last invalidation sent to the peer, in epoch ``_last_epoch``."""
        self._confirmed_last = "0-0"
        """... and of the last one the peer confirmed (saved in the link state)."""
        self._last_epoch = ""
        self.position = ZERO
        """The last local stream entry handed to the window (the cursor follows once confirmed)."""
        self.last_sent_ms = 0.0
        self.pending_gap: tuple[str, str] | None = None
        self._gap_sent: tuple[str, str] | None = None
        """The pending gap, while an envelope carrying it waits for the peer's reply."""
        """The last gap the peer appended: not sent again while the link state still holds it
        (from the peer's confirmation until the next save clears it)."""
        self._forwarded = metrics.forwarded.labels(region, peer)
        self._duplicates = metrics.duplicates.labels(region, peer)
        self._batch = metrics.batch_size.labels(region, "forward")
        self._catch_ups = metrics.catch_ups.labels(region, peer)
        self._saving = _Saving()
        self._unsaved = False
        self._progressed = False
        self._failures = 0

    def reroute(self, remote: AsyncRedis) -> None:
        """Reach the peer's mirror stream through ``remote`` from the next session on: its slot
        moved to another node of the peer's Redis Cluster (the current session, if any, fails
        on ``MOVED`` and is opened again, on ``remote``, with every unconfirmed envelope)."""
        self.window.remote = remote

    # -- start-up -------------------------------------------------------------------------------

    async def load(self) -> None:
        """Resume from what the link state in the local Redis says was delivered."""
        state: dict[Any, Any] = await self.local.hgetall(self._link_key)
        self._last_epoch = self.epoch.value
        if state.get(b"epoch", b"").decode() == self.epoch.value:
            self.last = state.get(b"last", b"0-0").decode()
        else:
            self.last = "0-0"
        self._confirmed_last = self.last
        if b"gap_after" in state:
            self.pending_gap = (state[b"gap_after"].decode(), state[b"gap_upto"].decode())

    async def start(self) -> None:
        """Load the link state and the durable cursor (taking over dead consumers' entries)."""
        await self.load()
        await self.cursor.load()
        self.position = self.cursor.position
        self.window.clear()

    # -- the loop -------------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Send until drained; reports ready once the cursor is known."""
        started = await until_ok(
            self.start,
            self.drain,
            name=self.name,
            on_error=self._on_error,
            backoff_cap_ms=self.backoff_cap_ms,
        )
        task_status.started()
        if not started:
            return
        while not self.drain.requested:
            try:
                await self._session()
            except* Resend:
                self.subscription.leave()
            except* REDIS_ERRORS as errors:
                exc = errors.exceptions[0]
                assert isinstance(exc, Exception)
                self._on_error(exc)
                self._spans_failed(exc)
                failures = self._failed()
                log_failure(self.name, exc, failures)
                await self.drain.sleep(backoff_seconds(failures, cap_ms=self.backoff_cap_ms))
            except* PoisonedBatch as errors:  # about entries read: tried again, then dead-lettered
                poisoned = errors.exceptions[0]
                assert isinstance(poisoned, PoisonedBatch)
                self._failed()
                attempts = self.guard.failed(poisoned)
                await self.drain.sleep(backoff_seconds(attempts, cap_ms=self.backoff_cap_ms))
        self.subscription.leave()
        log.info("%s: drained", self.name)

    def _failed(self) -> int:
        """Count a failed session (again from 1 after one that made progress); returns the count."""
        self._failures = 1 if self._progressed else self._failures + 1
        self.subscription.leave()  # catch up from the stream, from the cursor
        return self._failures

    def _spans_failed(self, exc: Exception) -> None:
        """End the ``send`` spans of the envelopes the peer did not answer as failed (ERROR,
        ``error.type``); sent again later, each attempt has spans of its own."""
        for out in self.window.unconfirmed:
            if out.spans:
                self.tracer.end_forward(out.spans, duplicate=False, error=exc)
                out.spans = self.tracer.send_again(out.spans)

    async def _session(self) -> None:
        """One connection to the peer: envelopes written as they come, replies read by a task of
        their own. Ends at a drain, or with the first error."""
        self._progressed = False
        self.window.keep_epoch(self._follow_epoch())  # envelopes of a lost stream are not sent
        try:
            buried = await self.guard.bury()
            if buried is not None:  # the peer misses it: tell it (with the next envelope)
                after = str(StreamId.parse(buried).previous())
                await self.add_gap(after, buried.decode(), why="were dead-lettered, not sent")
            await self.window.open()
            async with anyio.create_task_group() as replies:
                replies.start_soon(self.window.serve, self._confirmed, self._commit)
                next_claim = time.monotonic() + self.claim_interval_ms / 1000
                while not self.drain.requested:
                    if time.monotonic() >= next_claim:
                        await self.cursor.claim(self.claim_idle_ms)
                        next_claim = time.monotonic() + self.claim_interval_ms / 1000
                    await self._step()
                await self.window.settle()
                replies.cancel_scope.cancel()
            if self._unsaved:  # confirmed since the last save
                await self._commit()
        finally:
            await self.window.close()

    async def _step(self) -> None:
        check_renewed(self.fence)
        self._follow_epoch()
        subscription: Subscription = self.subscription
        if subscription.dropped:
            subscription.join()  # first, so that nothing written meanwhile is missed
            self._catch_ups.inc()
            await self._catch_up(None)
            return
        fed = subscription.get_nowait()
        wait_ms = self.last_sent_ms + self.heartbeat_interval_ms - self.clock.now_ms()
        if fed is None and self._gap_to_send() is None and wait_ms > 0:
            with self.drain.interruptible() as scope:
                scope.deadline = min(scope.deadline, anyio.current_time() + wait_ms / 1000)
                fed = await subscription.get()
        if fed is not None:
            if self.window.full:  # (a cancel scope costs more than a read of a few entries)
                with self.drain.interruptible():  # what queues meanwhile goes in one envelope
                    await self.window.room()
            await self._take(subscription.take_following(fed, self.reader.count))
        elif not subscription.dropped and not self.drain.requested:
            await self.idle()

    async def _take(self, fed: FedBatch) -> None:
        """Send a batch from the feed: what lies between the cursor and it is read first."""
        if fed.last <= self.position:
            return
        if fed.after is None or fed.after > self.position:
            await self._catch_up(fed.last if fed.after is None else fed.after)
            if fed.after is None or fed.last <= self.position or self.drain.requested:
                return
        if fed.after < self.position or self.guard.skips(fed.entries):
            # partly sent already (or holding an entry dead-lettered): the rest, parsed on its
            # own (not fed.events filtered: conflation may have folded a key of the rest into an
            # entry already sent, which the peer applied before the rest was written)
            entries = [e for e in fed.entries if StreamId.parse(e[0]) > self.position]
            await self._send_entries(entries)
        else:
            await self.deliver(fed.events, fed.last, fed.entries, encoded=fed)

    async def _catch_up(self, until: StreamId | None) -> None:
        """Send the entries after the cursor (up to ``until``, or to the end) in batches."""
        end = "+" if until is None else str(until)
        while not self.drain.requested:
            count = self.guard.count(self.position, self.reader.count)
            reply: Any = await self.local.xrange(
                self.reader.stream, f"({self.position}", end, count=count
            )
            entries: list[Entry] = reply
            if not entries:
                return
            await self._send_entries(entries)
            if len(entries) < count:
                return

    async def _send_entries(self, entries: Sequence[Entry]) -> None:
        """Parse and conflate ``entries`` (read from the stream), and send them; entries
        dead-lettered are passed over (their gap goes to the peer)."""
        with preparing(entries):
            valid, _dead, _lost = parse_batch(self.guard.kept(entries), self.limits)
            valid, _conflated = conflate(valid)  # dead and conflated: counted by the local apply
        await self.deliver(valid, StreamId.parse(entries[-1][0]), entries)

    # -- one batch ------------------------------------------------------------------------------

    async def __call__(self, entries: Sequence[Entry]) -> None:
        """Deliver ``entries`` (read from this sender's group) and acknowledge them."""
        if not entries:
            await self.deliver([], self.position, ())
            return
        with preparing(entries):
            valid, _dead, lost = parse_batch(self.guard.kept(entries), self.limits)
        if lost:
            self.note_gap(str(StreamId.parse(lost[0]).previous()), lost[-1].decode())
        last = StreamId.parse(entries[-1][0])
        await self.deliver(valid, last, entries, ack=[entry_id for entry_id, _ in entries])

    async def deliver(
        self,
        valid: Sequence[Invalidation],
        cursor: StreamId,
        entries: Sequence[Entry],
        *,
        ack: Sequence[bytes] = (),
        encoded: FedBatch | None = None,
    ) -> None:
        """Send ``valid`` (with a pending gap notice); the cursor moves to ``cursor``, past
        ``entries`` (what ``valid`` was read from), once the peer confirmed. ``encoded``: the fed
        batch ``valid`` comes from, whose events are encoded once for every peer."""
        epoch = self._follow_epoch()
        if self.window.full:
            with self.drain.interruptible():
                await self.window.room()
        if self.window.full:  # a drain stopped the wait: the cursor stays before these entries
            return
        out = Outgoing(
            "", epoch, self.last, b"", cursor, len(entries), prev=self.last, ack=list(ack)
        )
        gap = self._gap_to_send()
        if valid or gap:
            with preparing(entries):
                self._envelope(out, valid, gap, encoded)
            if valid:
                out.last = self.last = valid[-1].id
                out.events = len(valid)
            self._sending(out)
        self.window.add(out)
        self.position = max(self.position, cursor)
        self._batch.observe(len(valid))
        await self._flush()

    def _envelope(
        self,
        out: Outgoing,
        valid: Sequence[Invalidation],
        gap: tuple[str, str] | None,
        encoded: FedBatch | None,
    ) -> None:
        """Fill in ``out``: the batch envelope of ``valid`` (a notice if none), and its spans."""
        raw: msgspec.Raw | None = None
        events: Sequence[Invalidation] = valid
        if encoded is None or encoded.traced:
            events, out.spans = self.tracer.start_forward(self.peer, self._mirror, valid)
        if encoded is not None and not out.spans:
            raw = encoded.encoded_events
        batch = (BatchOut if raw is not None else Batch)(
            origin=self.region,
            epoch=out.epoch,
            prev=self.last,
            events=raw if raw is not None else events,  # type: ignore[arg-type]
            sent_ms=int(self.clock.now_ms()),
            gap_from=gap[0] if gap else None,
            gap_to=gap[1] if gap else None,
        )
        out.kind = "batch" if valid else "notice"
        out.payload, out.gap = _encoder.encode(batch), gap

    def _gap_to_send(self) -> tuple[str, str] | None:
        return self.pending_gap if self._gap_sent is None else None

    def _sending(self, out: Outgoing) -> None:
        self.last_sent_ms = self.clock.now_ms()
        if out.gap is not None:
            self._gap_sent = out.gap

    async def _flush(self) -> None:
        """Write what the window holds (without a session: send it and wait for the replies)."""
        if self.window.is_open:
            await self.window.send()
        else:
            await self.window.flush(self._confirmed, self._commit)

    def _confirmed(self, out: Outgoing, appended: bool) -> None:
        """The peer answered for ``out``: count it, and note how far the peer got."""
        self._progressed = self._unsaved = True
        if out.epoch != self._last_epoch:  # sent before the stream was lost: nothing to save
            return
        if out.kind:
            self.tracer.end_forward(out.spans, duplicate=not appended)
        if out.kind == "batch":
            if appended:
                self._forwarded.inc(out.events)
            else:
                self._duplicates.inc()
                log.info("%s: batch up to %s was already delivered", self.peer, out.last)
            if StreamId.parse(out.last) > StreamId.parse(self._confirmed_last):
                self._confirmed_last = out.last
        delivered_gap = out.gap if appended else None
        if out.gap is not None:
            self._gap_sent = None
            if not appended:  # the peer did not append the batch, so not its gap either
                self.window.add(self._gap_notice(out.gap, out.last, out.epoch))
        if delivered_gap is not None:
            self._saving.gap = delivered_gap
            if delivered_gap == self.pending_gap:  # not sent again, before the save or after
                self.pending_gap = None
        saving = self._saving
        saving.cursor, saving.count = max(saving.cursor, out.cursor), saving.count + out.count
        saving.ack += out.ack

    async def _commit(self) -> None:
        """Save the link state and move the cursor as far as the peer confirmed, in one round
        trip to the local Redis."""
        saving, self._saving, self._unsaved = self._saving, _Saving(), False
        epoch = self._last_epoch
        state = {"epoch": epoch, "last": self._confirmed_last}
        try:
            await self.cursor.save(
                state=state,
                gap=saving.gap,
                cursor=saving.cursor,
                count=saving.count,
                ack=saving.ack,
            )
        except BaseException:
            if epoch == self._last_epoch:  # else it was the lost stream's progress: dropped
                self._saving, self._unsaved = saving.then(self._saving), True  # saved next time
            raise

    def _gap_notice(self, gap: tuple[str, str], prev: str, epoch: str) -> Outgoing:
        notice = Batch(
            origin=self.region,
            epoch=epoch,
            prev=prev,
            events=[],
            sent_ms=int(self.clock.now_ms()),
            gap_from=gap[0],
            gap_to=gap[1],
        )
        payload = encode_envelope(notice)
        out = Outgoing("notice", epoch, prev, payload, self.position, 0, prev=prev, gap=gap)
        self._sending(out)
        return out

    async def idle(self) -> None:
        """No new entries: tell the peer of a gap now (it may otherwise wait for traffic), or
        send a heartbeat if the link has been quiet for an interval (it also re-saves the
        cursor, which finds a lost group)."""
        epoch = self._follow_epoch()
        gap = self._gap_to_send()
        if gap is not None:
            self.window.add(self._gap_notice(gap, self.last, epoch))
        else:
            now = self.clock.now_ms()
            if now - self.last_sent_ms < self.heartbeat_interval_ms:
                return
            if await self._feed_stalled(now):
                return
            beat = Heartbeat(origin=self.region, epoch=epoch, last=self.last, sent_ms=int(now))
            payload = encode_envelope(beat)
            out = Outgoing("notice", epoch, self.last, payload, self.position, 0, prev=self.last)
            self._sending(out)
            self.window.add(out)
        await self._flush()

    async def _feed_stalled(self, now_ms: float) -> bool:
        """Whether the stream holds an entry after the cursor that the feed has not brought for
        a heartbeat interval (the local apply is stuck, e.g. its cache is down): then this
        sender leaves the feed and reads the stream itself, so the peers keep their pace."""
        reply: Any = await self.local.xrange(self.reader.stream, f"({self.position}", "+", count=1)
        if reply and now_ms - StreamId.parse(reply[0][0]).ms > self.heartbeat_interval_ms:
            log.info("%s: the local apply is behind; reading the stream itself", self.name)
            self.subscription.leave()
            return True
        return False

    def _follow_epoch(self) -> str:
        """The current epoch; when it changed (the stream was lost), nothing is delivered in it."""
        epoch = self.epoch.value
        if epoch != self._last_epoch:
            self._last_epoch, self.last, self._confirmed_last = epoch, "0-0", "0-0"
            self.position = self.cursor.position = ZERO
            self.cursor.entries_read = 0
            self._saving = _Saving()
            if not self.window.is_open:  # else their replies come, and are ignored
                self.window.clear()
            self._gap_sent = None
            self.guard.reset()  # failures were on entries of the lost stream
        return epoch

    def note_gap(self, after: str, upto: str, *, why: str = "were deleted before delivery") -> None:
        """Entries this peer never received were deleted (or dead-lettered): tell it with the
        next envelope."""
        if self.pending_gap is not None:
            after = min(after, self.pending_gap[0], key=StreamId.parse)
            upto = max(upto, self.pending_gap[1], key=StreamId.parse)
        self.pending_gap = (after, upto)
        log.warning("%s: entries after %s up to %s %s", self.peer, after, upto, why)

    async def add_gap(
        self, after: str, upto: str, *, why: str = "were deleted before delivery"
    ) -> None:
        """:meth:`note_gap`, kept in the link state too, so that a restart still sends it."""
        self.note_gap(after, upto, why=why)
        if self.pending_gap is not None:
            gap_after, gap_upto = self.pending_gap
            await self.local.hset(
                self._link_key, mapping={"gap_after": gap_after, "gap_upto": gap_upto}
            )

    async def entries_lost(self, ids: list[bytes]) -> None:
        """Pending entries whose data was deleted before they were sent (found by XAUTOCLAIM)."""
        await self.add_gap(str(StreamId.parse(ids[0]).previous()), ids[-1].decode())
