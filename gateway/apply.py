"""Local apply: invalidations written in this region take effect in this region's cache at once."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial

from invalgw.cache import UNLINK_CHUNK, Cache, queue_unlink
from invalgw.clock import ServerClock
from invalgw.conflate import conflate
from invalgw.deadletter import DeadLetter, DeadLetters
from invalgw.effects import Plan, plan_batch
from invalgw.epoch import Epoch
from invalgw.feed import Feed
from invalgw.gaps import Gaps
from invalgw.lag import LagWindow, LinkStatus, lag_counts, status_encoder
from invalgw.metrics import Metrics
from invalgw.policy import Resolver
from invalgw.proto import Invalidation, InvalidEntry, Limits, StreamId, parse_entry
from invalgw.read import Entry, GroupReader
from invalgw.scanner import ScanJob, Scanner
from invalgw.tracing import InvalidationTracer

log = logging.getLogger(__name__)


def parse_batch(
    entries: Sequence[Entry], limits: Limits
) -> tuple[list[Invalidation], list[DeadLetter], list[bytes]]:
    """Split entries into valid invalidations, dead letters, and IDs whose data is gone."""
    valid: list[Invalidation] = []
    dead: list[DeadLetter] = []
    lost: list[bytes] = []
    for entry_id, fields in entries:
        if not fields:
            lost.append(entry_id)
            continue
        try:
            valid.append(parse_entry(entry_id.decode(), fields, limits))
        except InvalidEntry as exc:
            dead.append(DeadLetter(entry_id, fields, exc.reason, exc.code))
    return valid, dead, lost


async def apply_and_ack(
    cache: Cache,
    reader: GroupReader,
    ids: Sequence[bytes],
    plan: Plan,
    status_key: str,
    status: LinkStatus,
) -> int:
    """Carry out ``plan``, then acknowledge ``ids`` with ``status``. Returns how many keys went.

    One transaction when the plan only unlinks, the cache is the stream's Redis and the keys fit
    one UNLINK; otherwise the effects go first, in commands of :data:`UNLINK_CHUNK` keys that
    other clients can interleave with (a transaction would hold the Redis for the whole batch).
    """
    if cache.in_stream_redis and plan.only_unlink and len(plan.unlink) <= UNLINK_CHUNK:
        return await ack_with_status(reader, ids, status_key, status, unlink=plan.unlink)
    removed = await cache.apply(plan)
    await ack_with_status(reader, ids, status_key, status)
    return removed


class AppliedRecord:
    """What one stage applied from one origin: metrics, the lag window, status and traces."""

    def __init__(
        self,
        *,
        region: str,
        origin: str,
        stage: str,
        stream: str,
        metrics: Metrics,
        tracer: InvalidationTracer,
        status: LinkStatus,
    ) -> None:
        self.region = region
        self.origin = origin
        self.stream = stream
        self.tracer = tracer
        self.status = status
        self.window = LagWindow()
        self._applied = metrics.applied
        self._lag = metrics.lag.labels(origin, region)
        self._removed = metrics.keys_removed.labels(region, origin)
        self._batch = metrics.batch_size.labels(region, stage)

    def __call__(
        self, events: list[Invalidation], removed: int, started_ns: int, origin_now_ms: float
    ) -> None:
        """Record ``events`` applied (``removed`` keys went), their lag at ``origin_now_ms``."""
        self._batch.observe(len(events))
        if not events:
            return
        for op, count in Counter(event.op for event in events).items():
            self._applied.labels(self.region, self.origin, op).inc(count)
        self._removed.inc(removed)
        self.status.applied += len(events)
        lags = lag_counts([event.id for event in events], origin_now_ms)
        self._lag.observe_counts([(lag / 1000, count) for lag, count in lags])
        self.window.add_counts(lags)
        self.tracer.applied(self.origin, self.stream, events, started_ns, origin_now_ms)


class LocalApplier:
    """Handler of the ``apply`` group on the local stream."""

    def __init__(
        self,
        *,
        region: str,
        reader: GroupReader,
        cache: Cache,
        dead_letters: DeadLetters,
        gaps: Gaps,
        limits: Limits,
        metrics: Metrics,
        clock: ServerClock,
        status: LinkStatus,
        status_key: str,
        epoch: Epoch,
        resolver: Resolver,
        scanner: Scanner,
        tracer: InvalidationTracer,
        feed: Feed | None = None,
    ) -> None:
        self.region = region
        self.feed = feed
        """Where each applied batch goes on to the peers' senders (read and parsed only here)."""
        self._conflated = metrics.conflated.labels(region)
        self.resolver = resolver
        self.scanner = scanner
        self.epoch = epoch
        self.reader = reader
        self.cache = cache
        self.dead_letters = dead_letters
        self.gaps = gaps
        self.limits = limits
        self.clock = clock
        self.status = status
        self.status_key = status_key
        self.record = AppliedRecord(
            region=region,
            origin=region,
            stage="apply",
            stream=reader.stream,
            metrics=metrics,
            tracer=tracer,
            status=status,
        )

    async def __call__(self, entries: Sequence[Entry]) -> None:
        valid, dead, lost = parse_batch(entries, self.limits)
        valid, conflated = conflate(valid)  # applied and sent once per key
        self._conflated.inc(conflated)
        if self.feed is not None:  # the peers' senders need not wait for this region's cache
            self.feed.publish(self.reader.after, entries, valid)
        await self.dead_letters.put(self.reader.stream, dead)
        if lost:
            await self.gaps.record(
                self.region,
                "local entries deleted before they were applied",
                after=str(StreamId.parse(lost[0]).previous()),
                upto=lost[-1].decode(),
            )
        plan = plan_batch(valid, self.region, self.resolver)
        started_ns = time.time_ns()
        scanning = {event.id.encode() for event in plan.scans}
        for event in plan.scans:  # acknowledged when the walk of the cache is done
            self.reader.hold(event.id.encode())
            ack = partial(self.reader.ack, [event.id.encode()])
            self.scanner.submit(ScanJob(event, self.region, ack))
        if valid and StreamId.parse(valid[-1].id) > StreamId.parse(self.status.last_id):
            self.status.last_id = valid[-1].id
        self.status.epoch = self.epoch.value
        acked = [entry_id for entry_id, _ in entries if entry_id not in scanning]
        removed = await apply_and_ack(
            self.cache, self.reader, acked, plan, self.status_key, self.status
        )
        self.record(valid, removed, started_ns, self.clock.now_ms())


async def ack_with_status(
    reader: GroupReader,
    ids: Sequence[bytes],
    status_key: str,
    status: LinkStatus,
    *,
    unlink: Sequence[str] = (),
) -> int:
    """Acknowledge ``ids`` and save ``status`` in one transaction, so both survive a crash.

    ``unlink``: keys of the same Redis to remove first, in the same transaction, so the effect
    and its acknowledgement take one round trip and land together or not at all. Returns how
    many of them existed. Keep them few: the transaction holds the Redis while it runs.

    ``ids`` may be empty: a batch of pattern invalidations only is acknowledged when their walks
    of the cache end, and its status is saved now.
    """
    async with reader.client.pipeline(transaction=True) as pipe:
        unlinks = queue_unlink(pipe, unlink)
        if ids:
            pipe.xack(reader.stream, reader.group, *ids)
        pipe.hset(status_key, status.origin, status_encoder.encode(status))
        results = await pipe.execute()
    return sum(results[:unlinks])
