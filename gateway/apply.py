"""Local apply: invalidations written in this region take effect in this region's cache at once."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis

from invalgw.cache import UNLINK_CHUNK, Cache
from invalgw.clock import ServerClock
from invalgw.conflate import conflate
from invalgw.connections import transaction
from invalgw.deadletter import DeadLetter, DeadLetters
from invalgw.effects import Key, Plan, plan_batch
from invalgw.epoch import Epoch
from invalgw.feed import Feed
from invalgw.functions import ACK, Fence, call_fenced, fenced_command, with_library
from invalgw.gaps import Gaps
from invalgw.lag import LagWindow, LinkStatus, lag_counts, status_encoder
from invalgw.metrics import Metrics
from invalgw.policy import Resolver
from invalgw.proto import (
    Invalidation,
    InvalidEntry,
    Limits,
    StreamId,
    parse_entry,
    parse_usual_batch,
)
from invalgw.read import Entry, GroupReader
from invalgw.retries import CacheRetries, RetryJob
from invalgw.scanner import ScanJob, Scanner
from invalgw.tracing import InvalidationTracer

log = logging.getLogger(__name__)


def parse_batch(
    entries: Sequence[Entry], limits: Limits
) -> tuple[list[Invalidation], list[DeadLetter], list[bytes]]:
    """Split entries into valid invalidations, dead letters, and IDs whose data is gone."""
    usual = parse_usual_batch(entries, limits)  # the usual batch, at once
    if usual is not None:
        return usual, [], []
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


@dataclass(frozen=True)
class ApplyContext:
    """What every applier of one region shares (local apply and the apply of each mirror)."""

    region: str
    cache: Cache
    retries: CacheRetries
    dead_letters: DeadLetters
    gaps: Gaps
    limits: Limits
    metrics: Metrics
    resolver: Resolver
    scanner: Scanner
    tracer: InvalidationTracer
    status_key: str
    fence: Fence | None
    """The lease acknowledgements are conditional on (None: a mirror stream on another node of
    a Redis Cluster than the lease; acknowledging what was applied is true whoever says it)."""


Done = Callable[[], Awaitable[None]]


def ack_when_done(reader: GroupReader, entry_id: bytes, parts: int) -> Done:
    """Hold ``entry_id`` (pending, not handed out again) until the returned callback has been
    called ``parts`` times (once per pattern walk or cache retry of the entry), then ack it.

    A call whose acknowledgement failed does not count: the caller calls again (else the entry
    would stay held, unread and pending, for the gateway's lifetime, and hold trimming back)."""
    reader.hold(entry_id)
    remaining = parts

    async def done() -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            try:
                await reader.ack([entry_id])
            except BaseException:
                remaining += 1  # not acknowledged: the caller calls again once Redis answers
                raise

    return done


@dataclass
class BatchWork:
    """One batch of a stage, planned: what each entry asks, and what goes in the background."""

    ids: list[bytes]
    """Every entry of the batch (acknowledged unless held)."""
    plan: Plan
    events: Callable[[], Iterable[tuple[bytes, Sequence[Invalidation]]]] = lambda: ()
    """Each entry's events, to tell which entries a node that does not answer holds back: asked
    only then, so a batch that went through pays nothing for it."""
    walks: dict[bytes, list[Invalidation]] = field(default_factory=dict)
    """Pattern invalidations of each entry: walked by the scanner, acknowledged when done."""
    held: set[bytes] = field(default_factory=set)
    """Entries left pending for their walks or cache retries (known once the effects ran)."""
    acking: bool = False
    """The acknowledgement was sent: if it failed, Redis may have carried it out all the same."""


async def apply_and_ack(
    ctx: ApplyContext, reader: GroupReader, origin: str, work: BatchWork, status: LinkStatus
) -> int:
    """Carry out ``work``, then acknowledge its entries with ``status``; returns keys removed.

    One transaction when the plan only unlinks, the cache is the stream's Redis and the keys fit
    one UNLINK; otherwise the effects go first, in commands of :data:`UNLINK_CHUNK` keys that
    other clients can interleave with (a transaction would hold the Redis for the whole batch).
    Entries with pattern walks, or with keys on a cache node that does not answer, stay pending
    until that work is done (:func:`ack_when_done`); the others are acknowledged now.
    """
    plan = work.plan
    if ctx.cache.in_stream_redis and plan.only_unlink and len(plan.unlink) <= UNLINK_CHUNK:
        _start_walks(ctx, reader, origin, work.walks, set())
        work.held = set(work.walks)
        acked = [entry_id for entry_id in work.ids if entry_id not in work.held]
        work.acking = True
        return await ack_with_status(
            reader, acked, ctx.status_key, status, fence=ctx.fence, unlink=plan.unlink
        )
    removed, failed = await ctx.cache.apply_parts(plan)
    waiting = _entries_waiting(work, failed)
    if waiting and not ctx.retries.has_room(len(failed.keys())):
        raise redis.ConnectionError("too many keys wait for cache nodes that do not answer")
    retry_done = _start_walks(ctx, reader, origin, work.walks, waiting)
    if waiting:
        ctx.retries.submit(
            RetryJob(failed, retry_done, ctx.metrics.keys_removed.labels(ctx.region, origin).inc)
        )
    work.held = work.walks.keys() | waiting
    acked = [entry_id for entry_id in work.ids if entry_id not in work.held]
    work.acking = True
    await ack_with_status(reader, acked, ctx.status_key, status, fence=ctx.fence)
    return removed


def _entries_waiting(work: BatchWork, failed: Plan) -> set[bytes]:
    """The entries with a key in ``failed``."""
    if not failed:
        return set()
    lost = failed.keys()
    return {
        entry_id
        for entry_id, events in work.events()
        if any(not lost.isdisjoint(event.keys) for event in events)
    }


def _start_walks(
    ctx: ApplyContext,
    reader: GroupReader,
    origin: str,
    walks: dict[bytes, list[Invalidation]],
    waiting: set[bytes],
) -> list[Done]:
    """Hold the entries that have walks or wait for a retry, start the walks; returns the
    callbacks the retry calls (one per entry in ``waiting``)."""
    retry_done: list[Done] = []
    for entry_id in walks.keys() | waiting:
        events = walks.get(entry_id, [])
        done = ack_when_done(reader, entry_id, len(events) + (entry_id in waiting))
        for event in events:
            ctx.scanner.submit(ScanJob(event, origin, done))
        if entry_id in waiting:
            retry_done.append(done)
    return retry_done


class AppliedRecord:
    """What one stage applied from one origin: metrics, the lag window, status and traces."""

    def __init__(
        self, ctx: ApplyContext, *, origin: str, stage: str, stream: str, status: LinkStatus
    ) -> None:
        self.region = ctx.region
        self.origin = origin
        self.stream = stream
        self.tracer = ctx.tracer
        self.status = status
        self.window = LagWindow()
        metrics = ctx.metrics
        self._applied = metrics.applied
        self._lag = metrics.lag.labels(ctx.region, origin)
        self._removed = metrics.keys_removed.labels(ctx.region, origin)
        self._batch = metrics.batch_size.labels(ctx.region, stage)
        self._applied_by_op: dict[str, Any] = {}

    def __call__(
        self, events: list[Invalidation], removed: int, started_ns: int, origin_now_ms: float
    ) -> None:
        """Record ``events`` applied (``removed`` keys went), their lag at ``origin_now_ms``.

        The status's ``applied`` count is the stage's to advance, before the acknowledgement
        transaction that saves it."""
        self._batch.observe(len(events))
        if not events:
            return
        ops = [event.op for event in events]
        if ops.count(ops[0]) == len(ops):  # the usual batch: one kind of invalidation
            self._applied_op(ops[0]).inc(len(ops))
        else:
            for op, count in Counter(ops).items():
                self._applied_op(op).inc(count)
        self._removed.inc(removed)
        lags = lag_counts([event.id for event in events], origin_now_ms)
        self._lag.observe_counts([(lag / 1000, count) for lag, count in lags])
        self.window.add_counts(lags)
        self.tracer.applied(self.origin, self.stream, events, started_ns, origin_now_ms)

    def _applied_op(self, op: str) -> Any:
        counter = self._applied_by_op.get(op)
        if counter is None:
            counter = self._applied_by_op[op] = self._applied.labels(self.region, self.origin, op)
        return counter

    async def guard(
        self, events: list[Invalidation], started_ns: int, effect: Awaitable[int]
    ) -> int:
        """Await ``effect`` (the apply); if it fails, record ERROR spans for ``events``."""
        try:
            return await effect
        except Exception as exc:
            self.tracer.failed(self.origin, self.stream, events, started_ns, exc)
            raise


class LocalApplier:
    """Handler of the ``apply`` group on the local stream."""

    def __init__(
        self,
        ctx: ApplyContext,
        *,
        reader: GroupReader,
        clock: ServerClock,
        status: LinkStatus,
        epoch: Epoch,
        feed: Feed | None = None,
    ) -> None:
        self.ctx = ctx
        self.feed = feed
        """Where each applied batch goes on to the peers' senders (read and parsed only here)."""
        self._conflated = ctx.metrics.conflated.labels(ctx.region)
        self.reader = reader
        self.clock = clock
        self.status = status
        self.epoch = epoch
        self.record = AppliedRecord(
            ctx, origin=ctx.region, stage="apply", stream=reader.stream, status=status
        )

    async def __call__(self, entries: Sequence[Entry]) -> None:
        ctx = self.ctx
        valid, dead, lost = parse_batch(entries, ctx.limits)
        valid, conflated = conflate(valid)  # applied and sent once per key
        self._conflated.inc(conflated)
        if self.feed is not None:  # the peers' senders need not wait for this region's cache
            self.feed.publish(self.reader.after, entries, valid)
        await ctx.dead_letters.put(self.reader.stream, dead)
        if lost:
            await ctx.gaps.record(
                ctx.region,
                "local entries deleted before they were applied",
                after=str(StreamId.parse(lost[0]).previous()),
                upto=lost[-1].decode(),
            )
        work = BatchWork(
            [entry_id for entry_id, _ in entries], plan_batch(valid, ctx.region, ctx.resolver)
        )
        work.events = lambda: ((event.id.encode(), (event,)) for event in valid)
        for event in work.plan.scans:
            work.walks[event.id.encode()] = [event]
        started_ns = time.time_ns()
        if valid and StreamId.parse(valid[-1].id) > StreamId.parse(self.status.last_id):
            self.status.last_id = valid[-1].id
        self.status.epoch = self.epoch.value
        self.status.applied += len(valid)  # saved with the acknowledgement, not a second later
        removed = await self.record.guard(
            valid, started_ns, apply_and_ack(ctx, self.reader, ctx.region, work, self.status)
        )
        self.record(valid, removed, started_ns, self.clock.now_ms())


async def ack_with_status(
    reader: GroupReader,
    ids: Sequence[bytes],
    status_key: str,
    status: LinkStatus,
    *,
    fence: Fence | None,
    unlink: Sequence[Key] = (),
) -> int:
    """Acknowledge ``ids`` and save ``status`` in one call, so both survive a crash; refused
    (``FENCED``) if ``fence``'s lease is no longer this gateway's.

    ``unlink``: keys of the same Redis to remove first, in the same transaction, so the effect
    and its acknowledgement take one round trip and land together. Returns how many of them
    existed. Keep them few: the transaction holds the Redis while it runs.

    ``ids`` may be empty: a batch of pattern invalidations only is acknowledged when their walks
    of the cache end, and its status is saved now.
    """
    keys = [reader.stream, status_key]
    args = [reader.group, status.origin, status_encoder.encode(status), *ids]
    if not unlink:
        await call_fenced(reader.client, ACK, fence, keys, args, lane=reader.lane)
        return 0
    commands: list[tuple[Any, ...]] = [
        ("UNLINK", *unlink[start : start + UNLINK_CHUNK])
        for start in range(0, len(unlink), UNLINK_CHUNK)
    ]
    commands.append(fenced_command(ACK, fence, keys, args))
    attempt = partial(transaction, reader.client, commands, lane=reader.lane)
    replies = await with_library(reader.client, attempt)
    return sum(replies[:-1])
