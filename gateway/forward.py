"""Forwarding: invalidations written here go, batched, into each peer region's mirror stream.

One sender per peer. The local stream is read and parsed once, by the local apply, which hands
every batch to each sender through the in-memory feed (:mod:`invalgw.feed`). A sender keeps its
own durable cursor: the ``to:<peer>`` consumer group's last-delivered ID, never read from, moved
with ``XGROUP SETID`` once the peer accepted (or already had) the entries. A sender that falls
behind (its feed queue overflowed, the peer was down, the gateway just started) reads the stream
itself from its cursor with XRANGE, then joins the feed again; so a slow or dead peer only grows
its own backlog, and trimming, which follows the slowest group, never passes its cursor.

A batch is one envelope appended by one call on the peer; the call refuses a batch whose last
origin ID the peer already holds, so a batch re-sent after a crash or a lost reply is recognised
as delivered.

For the same reason a drain need not wait for a peer that does not answer: a call still running
:data:`DRAIN_GRACE_S` after the drain started is abandoned, its entries stay pending, and the next
gateway sends them again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import msgspec
import redis

from invalgw.apply import parse_batch
from invalgw.clock import ServerClock
from invalgw.connections import REDIS_ERRORS, AsyncRedis
from invalgw.epoch import Epoch
from invalgw.feed import FedBatch, Feed, Subscription
from invalgw.metrics import Metrics
from invalgw.names import Names
from invalgw.proto import Batch, Heartbeat, Invalidation, Limits, StreamId, encode_envelope
from invalgw.proto.envelope import Envelope
from invalgw.proto.streamid import ZERO
from invalgw.read import Entry, GroupReader
from invalgw.stages import Drain, backoff_seconds, log_failure, until_ok
from invalgw.tracing import InvalidationTracer

log = logging.getLogger(__name__)

DRAIN_GRACE_S = 1.0
"""How long a drain waits for a call to a peer already under way (a healthy one answers sooner)."""

FEED_BOUND = 64
"""Batches a sender's feed queue holds before the sender drops out and reads the stream itself."""

APPEND_SCRIPT = """
-- KEYS[1] mirror stream, KEYS[2] its state hash
-- ARGV[1] 'batch' (deduplicated on its last origin ID) or 'notice' (always appended)
-- ARGV[2] origin epoch, ARGV[3] last origin ID in the envelope, ARGV[4] envelope,
-- ARGV[5] max length of the mirror stream
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local last = redis.call('HGET', KEYS[2], 'last')
if ARGV[1] == 'batch' then
  if epoch == ARGV[2] and last then
    local ams, aseq = parse(ARGV[3])
    local bms, bseq = parse(last)
    if ams < bms or (ams == bms and aseq <= bseq) then
      return {'duplicate', last}
    end
  end
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'd', ARGV[4])
  redis.call('HSET', KEYS[2], 'epoch', ARGV[2], 'last', ARGV[3])
  return {'ok', ARGV[3]}
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'd', ARGV[4])
return {'ok', last or '0-0'}
"""

CLEAR_GAP_SCRIPT = """
-- KEYS[1] link state hash; ARGV[1], ARGV[2] the gap that was delivered
if redis.call('HGET', KEYS[1], 'gap_after') == ARGV[1]
    and redis.call('HGET', KEYS[1], 'gap_upto') == ARGV[2] then
  return redis.call('HDEL', KEYS[1], 'gap_after', 'gap_upto')
end
return 0
"""


def _group_lost(exc: redis.ResponseError) -> bool:
    """The consumer group, or the whole stream, is gone (Redis restarted empty, key deleted)."""
    text = str(exc)
    return "NOGROUP" in text or "requires the key to exist" in text


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
        feed_bound: int = FEED_BOUND,
        claim_interval_ms: int = 15_000,
        claim_idle_ms: int = 60_000,
        backoff_cap_ms: int = 5000,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.region = region
        self.name = f"to:{peer}"
        self.drain = drain
        self.tracer = tracer
        self.peer = peer
        self.reader = reader
        self.local = local
        self.remote = remote
        self.epoch = epoch
        self.clock = clock
        self.limits = limits
        self.mirror_max_len = mirror_max_len
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.claim_interval_ms = claim_interval_ms
        self.claim_idle_ms = claim_idle_ms
        self.backoff_cap_ms = backoff_cap_ms
        self._on_error = on_error or (lambda exc: None)
        self.subscription = (feed or Feed()).subscribe(feed_bound)
        self._link_key = names.link(peer)
        self._mirror_keys = [names.mirror(region), names.mirror_state(region)]
        self._append = remote.register_script(APPEND_SCRIPT)
        self._clear_gap = local.register_script(CLEAR_GAP_SCRIPT)
        self.last = "0-0"
        """Origin ID of the last invalidation delivered to the peer, in epoch ``_last_epoch``."""
        self._last_epoch = ""
        self.position = ZERO
        """The durable cursor: the last local stream entry the peer accepted (or had)."""
        self.entries_read = 0
        """Entries of the stream up to :attr:`position` (Redis shows the group's lag from it)."""
        self._claimed: list[bytes] = []
        """Entries taken over from dead consumers' pending lists, acknowledged once passed."""
        self.last_sent_ms = 0.0
        self.pending_gap: tuple[str, str] | None = None
        self._forwarded = metrics.forwarded.labels(region, peer)
        self._duplicates = metrics.duplicates.labels(region, peer)
        self._batch = metrics.batch_size.labels(region, "forward")
        self._link_up = metrics.link_up.labels(region, peer)
        self._in_flight = metrics.in_flight.labels(region, peer)
        self._catch_ups = metrics.catch_ups.labels(region, peer)
        self._reclaimed = metrics.reclaimed.labels(region, self.name)

    # -- start-up -------------------------------------------------------------------------------

    async def load(self) -> None:
        """Resume from what the link state in the local Redis says was delivered."""
        state: dict[Any, Any] = await self.local.hgetall(self._link_key)
        self._last_epoch = self.epoch.value
        if state.get(b"epoch", b"").decode() == self.epoch.value:
            self.last = state.get(b"last", b"0-0").decode()
        else:
            self.last = "0-0"
        if b"gap_after" in state:
            self.pending_gap = (state[b"gap_after"].decode(), state[b"gap_upto"].decode())

    async def start(self) -> None:
        """Load the link state and the durable cursor; take over dead consumers' entries."""
        await self.load()
        if await self.reader.ensure_group():
            log.info("%s: created consumer group %r", self.name, self.reader.group)
        await self.claim(0)
        await self._load_cursor()

    async def _load_cursor(self) -> None:
        """The cursor is the group's last-delivered ID, or just before the first entry still
        pending in the group (read by a consumer that died before it was sent)."""
        stream, group = self.reader.stream, self.reader.group
        infos: list[dict[str, Any]] = await self.local.xinfo_groups(stream)
        info = next((i for i in infos if i["name"] == group.encode()), None)
        if info is None:
            await self._recreate()
            return
        position = StreamId.parse(info["last-delivered-id"])
        entries_read = info.get("entries-read")
        if entries_read is None:
            stream_info: dict[str, Any] = await self.local.xinfo_stream(stream)
            added, lag = int(stream_info["entries-added"]), info.get("lag")
            entries_read = added - int(lag) if lag is not None else added - stream_info["length"]
        entries_read = max(0, int(entries_read))
        claimed, self._claimed = self._claimed, []
        if claimed:
            first = min(StreamId.parse(entry_id) for entry_id in claimed).previous()
            if first < position:
                position, entries_read = first, max(0, entries_read - len(claimed))
            async with self.local.pipeline(transaction=True) as pipe:
                pipe.xgroup_setid(stream, group, str(position), entries_read=entries_read)
                pipe.xack(stream, group, *claimed)
                await pipe.execute()
            self.reader.release(claimed)
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
            await self.entries_lost(lost)

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
        next_claim = time.monotonic() + self.claim_interval_ms / 1000
        failures = 0
        while not self.drain.requested:
            try:
                if time.monotonic() >= next_claim:
                    await self.claim(self.claim_idle_ms)
                    next_claim = time.monotonic() + self.claim_interval_ms / 1000
                await self._step()
                failures = 0
            except REDIS_ERRORS as exc:
                failures += 1
                self._on_error(exc)
                log_failure(self.name, exc, failures)
                self.subscription.leave()  # catch up from the cursor once the peer answers
                await self.drain.sleep(backoff_seconds(failures, cap_ms=self.backoff_cap_ms))
        self.subscription.leave()
        log.info("%s: drained", self.name)

    async def _step(self) -> None:
        self._follow_epoch()
        subscription: Subscription = self.subscription
        if subscription.dropped:
            subscription.join()  # first, so that nothing written meanwhile is missed
            self._catch_ups.inc()
            await self._catch_up(None)
            return
        fed = subscription.get_nowait()
        wait_ms = self.last_sent_ms + self.heartbeat_interval_ms - self.clock.now_ms()
        if fed is None and self.pending_gap is None and wait_ms > 0:
            with self.drain.interruptible() as scope:
                scope.deadline = min(scope.deadline, anyio.current_time() + wait_ms / 1000)
                fed = await subscription.get()
        if fed is not None:
            await self._take(fed)
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
        entries: Sequence[Entry] = fed.entries
        events: Sequence[Invalidation] = fed.events
        if fed.after < self.position:  # partly sent already
            entries = [e for e in entries if StreamId.parse(e[0]) > self.position]
            events = [e for e in events if StreamId.parse(e.id) > self.position]
        await self.deliver(events, fed.last, len(entries))

    async def _catch_up(self, until: StreamId | None) -> None:
        """Send the entries after the cursor (up to ``until``, or to the end) in batches."""
        end = "+" if until is None else str(until)
        count = self.reader.count
        while not self.drain.requested:
            reply: Any = await self.local.xrange(
                self.reader.stream, f"({self.position}", end, count=count
            )
            entries: list[Entry] = reply
            if not entries:
                return
            valid, _dead, _lost = parse_batch(entries, self.limits)  # dead: the apply's business
            before = self.position
            await self.deliver(valid, StreamId.parse(entries[-1][0]), len(entries))
            if len(entries) < count or self.position == before:
                return

    # -- one batch ------------------------------------------------------------------------------

    async def __call__(self, entries: Sequence[Entry]) -> None:
        """Deliver ``entries`` (read from this sender's group) and acknowledge them."""
        if not entries:
            await self.deliver([], self.position, 0)
            return
        valid, _dead, lost = parse_batch(entries, self.limits)
        if lost:
            self.note_gap(str(StreamId.parse(lost[0]).previous()), lost[-1].decode())
        last = StreamId.parse(entries[-1][0])
        await self.deliver(valid, last, len(entries), ack=[entry_id for entry_id, _ in entries])

    async def deliver(
        self,
        valid: Sequence[Invalidation],
        cursor: StreamId,
        count: int,
        *,
        ack: Sequence[bytes] = (),
    ) -> None:
        """Send ``valid`` (with a pending gap notice) and move the cursor to ``cursor``, which
        passes ``count`` more entries of the stream."""
        epoch = self._follow_epoch()
        gap = self.pending_gap
        if valid or gap:
            events, spans = self.tracer.start_forward(self.peer, self._mirror_keys[0], valid)
            batch = Batch(
                origin=self.region,
                epoch=epoch,
                prev=self.last,
                events=events,
                sent_ms=int(self.clock.now_ms()),
                gap_from=gap[0] if gap else None,
                gap_to=gap[1] if gap else None,
            )
            kind = "batch" if valid else "notice"
            last = valid[-1].id if valid else self.last
            try:
                delivered = await self._send(kind, batch, last)
            except BaseException:
                self.tracer.end_forward(spans, duplicate=False)
                raise
            self.tracer.end_forward(spans, duplicate=delivered is False)
            if delivered is None:  # a drain gave up on the peer: the cursor stays where it was
                return
            if delivered:
                self._forwarded.inc(len(valid))
            elif valid:
                self._duplicates.inc()
                log.info("%s: batch up to %s was already delivered", self.peer, last)
                if gap:  # the peer did not append the batch, so not its gap either
                    await self._send("notice", msgspec.structs.replace(batch, events=[]), last)
            if valid and StreamId.parse(last) > StreamId.parse(self.last):
                self.last = last
        await self._save(epoch, gap, cursor, count, ack)
        self._batch.observe(len(valid))

    async def _save(
        self,
        epoch: str,
        gap: tuple[str, str] | None,
        cursor: StreamId,
        count: int,
        ack: Sequence[bytes] = (),
    ) -> None:
        """Link state, cursor and acknowledgements in one round trip to the local Redis."""
        stream, group = self.reader.stream, self.reader.group
        cursor = max(cursor, self.position)
        entries_read = self.entries_read + count if cursor > self.position else self.entries_read
        passed = [i for i in self._claimed if StreamId.parse(i) <= cursor] if self._claimed else []
        async with self.local.pipeline(transaction=False) as pipe:
            pipe.hset(self._link_key, mapping={"epoch": epoch, "last": self.last})
            if gap:
                # Only the gap just delivered: one noted meanwhile (by trimming) must stay.
                await self._clear_gap(keys=[self._link_key], args=list(gap), client=pipe)
            pipe.xgroup_setid(stream, group, str(cursor), entries_read=entries_read)
            if ack or passed:
                pipe.xack(stream, group, *ack, *passed)
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, redis.ResponseError) and _group_lost(result):
                await self._recreate()
                return
            if isinstance(result, Exception):
                raise result
        self.position, self.entries_read = cursor, entries_read
        if gap == self.pending_gap:
            self.pending_gap = None
        if passed:
            self._claimed = [i for i in self._claimed if i not in set(passed)]
            self.reader.release(passed)

    async def _recreate(self) -> None:
        """The group is gone: create it again from the stream's start, counted (the reader's hook
        also starts a new epoch, once, whichever stage of the stream saw the loss first)."""
        await self.reader.recreate()
        self._claimed = []
        self.position, self.entries_read = ZERO, 0
        self.subscription.leave()

    async def idle(self) -> None:
        """No new entries: tell the peer of a gap now (it may otherwise wait for traffic), or
        send a heartbeat if the link has been quiet for an interval."""
        if self.pending_gap is not None:
            await self.deliver([], self.position, 0)
            return
        now = self.clock.now_ms()
        if now - self.last_sent_ms < self.heartbeat_interval_ms:
            return
        epoch = self._follow_epoch()
        heartbeat = Heartbeat(origin=self.region, epoch=epoch, last=self.last, sent_ms=int(now))
        if await self._send("notice", heartbeat, self.last) is not None:
            await self._save(epoch, None, self.position, 0)  # also finds a lost group

    def _follow_epoch(self) -> str:
        """The current epoch; when it changed (the stream was lost), nothing is delivered in it."""
        epoch = self.epoch.value
        if epoch != self._last_epoch:
            self._last_epoch, self.last = epoch, "0-0"
            self.position, self.entries_read = ZERO, 0
        return epoch

    def note_gap(self, after: str, upto: str) -> None:
        """Entries this peer never received were deleted: tell it with the next envelope."""
        if self.pending_gap is not None:
            after = min(after, self.pending_gap[0], key=StreamId.parse)
            upto = max(upto, self.pending_gap[1], key=StreamId.parse)
        self.pending_gap = (after, upto)
        log.warning(
            "%s: entries after %s up to %s were deleted before delivery", self.peer, after, upto
        )

    async def add_gap(self, after: str, upto: str) -> None:
        """:meth:`note_gap`, kept in the link state too, so that a restart still sends it."""
        self.note_gap(after, upto)
        if self.pending_gap is not None:
            gap_after, gap_upto = self.pending_gap
            await self.local.hset(
                self._link_key, mapping={"gap_after": gap_after, "gap_upto": gap_upto}
            )

    async def entries_lost(self, ids: list[bytes]) -> None:
        """Pending entries whose data was deleted before they were sent (found by XAUTOCLAIM)."""
        await self.add_gap(str(StreamId.parse(ids[0]).previous()), ids[-1].decode())

    async def _send(self, kind: str, envelope: Envelope, last: str) -> bool | None:
        """Append ``envelope`` on the peer; False if the peer already had this batch, None if a
        drain gave up waiting for the peer."""
        args: list[bytes | str | int] = [kind, envelope.epoch, last]
        args += [encode_envelope(envelope), self.mirror_max_len]
        self._in_flight.inc()
        with self.drain.interruptible(DRAIN_GRACE_S) as call:
            try:
                reply = await self._append(keys=self._mirror_keys, args=args)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._link_up.set(0)
                raise
            finally:
                self._in_flight.dec()
        if call.cancelled_caught:
            log.warning("%s: draining: gave up waiting; sent again after a restart", self.peer)
            return None
        self._link_up.set(1)
        self.last_sent_ms = self.clock.now_ms()
        return bool(reply[0] == b"ok")
