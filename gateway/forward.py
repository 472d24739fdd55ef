"""Forwarding: invalidations written here go, batched, into each peer region's mirror stream.

One forwarder per peer, each with its own consumer group on the local stream, so a slow or dead
peer only grows its own backlog. A batch is one envelope appended by one script call on the peer;
the script refuses a batch whose last origin ID it already holds, so a batch re-sent after a crash
or a lost reply is recognised as delivered. The local entries are acknowledged only after the peer
accepted (or already had) them.

For the same reason a drain need not wait for a peer that does not answer: a call still running
:data:`DRAIN_GRACE_S` after the drain started is abandoned, its entries stay pending, and the next
gateway sends them again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import redis

from invalgw.apply import parse_batch
from invalgw.clock import ServerClock
from invalgw.connections import AsyncRedis
from invalgw.epoch import Epoch
from invalgw.metrics import Metrics
from invalgw.names import Names
from invalgw.proto import Batch, Heartbeat, Limits, StreamId, encode_envelope
from invalgw.proto.envelope import Envelope
from invalgw.read import Entry, GroupReader
from invalgw.stages import Drain
from invalgw.tracing import InvalidationTracer

log = logging.getLogger(__name__)

DRAIN_GRACE_S = 1.0
"""How long a drain waits for a call to a peer already under way (a healthy one answers sooner)."""

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


class Forwarder:
    """Handler of the ``to:<peer>`` group: delivers batches to one peer's mirror stream."""

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
    ) -> None:
        self.region = region
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
        self._link_key = names.link(peer)
        self._mirror_keys = [names.mirror(region), names.mirror_state(region)]
        self._append = remote.register_script(APPEND_SCRIPT)
        self._clear_gap = local.register_script(CLEAR_GAP_SCRIPT)
        self.last = "0-0"
        """Origin ID of the last invalidation delivered to the peer, in epoch ``_last_epoch``."""
        self._last_epoch = ""
        self.last_sent_ms = 0.0
        self.pending_gap: tuple[str, str] | None = None
        self._forwarded = metrics.forwarded.labels(region, peer)
        self._duplicates = metrics.duplicates.labels(region, peer)
        self._batch = metrics.batch_size.labels(region, "forward")
        self._link_up = metrics.link_up.labels(region, peer)

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

    async def __call__(self, entries: Sequence[Entry]) -> None:
        valid, _dead, lost = parse_batch(entries, self.limits)
        if lost:
            self.note_gap(str(StreamId.parse(lost[0]).previous()), lost[-1].decode())
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
            except BaseException as exc:
                self.tracer.end_forward(spans, duplicate=False, error=exc)
                raise
            self.tracer.end_forward(spans, duplicate=delivered is False)
            if delivered is None:  # a drain gave up on the peer: the entries stay pending
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
        async with self.local.pipeline(transaction=False) as pipe:
            pipe.hset(self._link_key, mapping={"epoch": epoch, "last": self.last})
            if gap:
                # Only the gap just delivered: one noted meanwhile (by trimming) must stay.
                await self._clear_gap(keys=[self._link_key], args=list(gap), client=pipe)
            if entries:
                pipe.xack(self.reader.stream, self.reader.group, *[e for e, _ in entries])
            await pipe.execute()
        if gap == self.pending_gap:
            self.pending_gap = None
        self._batch.observe(len(valid))

    async def idle(self) -> None:
        """No new entries: tell the peer of a gap now (it may otherwise wait for traffic), or
        send a heartbeat if the link has been quiet for an interval."""
        if self.pending_gap is not None:
            await self(())
            return
        now = self.clock.now_ms()
        if now - self.last_sent_ms < self.heartbeat_interval_ms:
            return
        epoch = self._follow_epoch()
        heartbeat = Heartbeat(origin=self.region, epoch=epoch, last=self.last, sent_ms=int(now))
        await self._send("notice", heartbeat, self.last)

    def _follow_epoch(self) -> str:
        """The current epoch; when it changed (the stream was lost), nothing is delivered in it."""
        epoch = self.epoch.value
        if epoch != self._last_epoch:
            self._last_epoch, self.last = epoch, "0-0"
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
        with self.drain.interruptible(DRAIN_GRACE_S) as call:
            try:
                reply = await self._append(keys=self._mirror_keys, args=args)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._link_up.set(0)
                raise
        if call.cancelled_caught:
            log.warning("%s: draining: gave up waiting; the batch stays pending", self.peer)
            return None
        self._link_up.set(1)
        self.last_sent_ms = self.clock.now_ms()
        return bool(reply[0] == b"ok")
