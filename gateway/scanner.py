"""Pattern invalidations: every key of a group or namespace, walked in the background.

An invalidation with ``pattern`` (``{user:1001}:*``, ``catalog:v2:*``) becomes a scan job. The
scanner walks the cache with SCAN in bounded batches (on every primary of a cluster) and applies
the event's mode to each batch, one job at a time, while ordinary invalidations keep flowing
through their stage. The job's stream entry is acknowledged only when the walk is complete, so a
crash mid-walk redoes it on restart (every effect is idempotent).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from invalgw.cache import Cache
from invalgw.connections import REDIS_ERRORS
from invalgw.deadletter import DeadLetters, event_letter
from invalgw.effects import Plan, plan_keys
from invalgw.fence import is_fence_key
from invalgw.metrics import Metrics
from invalgw.policy import Resolver
from invalgw.proto import Invalidation
from invalgw.stages import Drain, backoff_seconds, log_failure

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0
"""How often a walk logs how far it got (keys matched, removed, and the rate)."""
MAX_ATTEMPTS = 3
"""Walks of one job that fail on something other than Redis before it is dead-lettered."""


@dataclass(frozen=True)
class ScanJob:
    event: Invalidation
    origin: str
    done: Callable[[], Awaitable[None]]
    """Called once every matching key has been handled (acknowledges the stream entry)."""

    @property
    def key(self) -> tuple[str, str]:
        return self.origin, self.event.id


class Scanner:
    def __init__(
        self,
        cache: Cache,
        resolver: Resolver,
        *,
        region: str,
        metrics: Metrics,
        drain: Drain,
        batch: int = 1000,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self.cache = cache
        self.dead_letters = dead_letters
        self.resolver = resolver
        self.region = region
        self.drain = drain
        self.batch = batch
        self._jobs: MemoryObjectSendStream[ScanJob]
        self._queue: MemoryObjectReceiveStream[ScanJob]
        self._jobs, self._queue = anyio.create_memory_object_stream[ScanJob](math.inf)
        self._active: dict[tuple[str, str], list[Callable[[], Awaitable[None]]]] = {}
        """Jobs queued or running, with the ``done`` still to call: the job's own, then those of
        the same jobs submitted meanwhile."""
        self._keys = metrics.pattern_keys
        self._removed = metrics.pattern_keys_removed
        self._finished = metrics.pattern_invalidations
        self._in_progress = metrics.pattern_in_progress.labels(region)

    def submit(self, job: ScanJob) -> None:
        """Queue ``job`` unless the same job is already queued or running (a redelivery, or
        another entry naming the same event): then it joins that walk, and its ``done`` is
        called when the walk ends, so its entry is acknowledged too, never left pending."""
        joined = self._active.get(job.key)
        if joined is not None:
            joined.append(job.done)
            return
        try:
            self._jobs.send_nowait(job)
        except anyio.ClosedResourceError:  # stopped: the entry stays pending for the next run
            return
        self._active[job.key] = [job.done]
        self._in_progress.set(len(self._active))

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run queued jobs one after the other until drained."""
        task_status.started()
        with self._jobs, self._queue:
            while not self.drain.requested:
                with self.drain.interruptible():
                    job = await self._queue.receive()
                if self.drain.requested:
                    break
                try:
                    await self._run(job)
                finally:
                    self._active.pop(job.key, None)
                    self._in_progress.set(len(self._active))

    def close(self) -> None:
        """Take no more jobs (for a scanner that never ran; :meth:`run` closes on its own)."""
        self._jobs.close()
        self._queue.close()

    async def _run(self, job: ScanJob) -> None:
        """Walk until done; Redis errors are retried, any other error :data:`MAX_ATTEMPTS`
        times, after which the job is dead-lettered and acknowledged (never a crash loop)."""
        failures = errors = 0
        failed: Exception | None = None  # given up: only the dead letter is left to write,
        while not self.drain.requested:  # which Redis may refuse too (retried, never fatal)
            try:
                if failed is not None:
                    await self._give_up(job, failed)
                elif await self._walk(job):
                    await self._done(job)
            except REDIS_ERRORS as exc:
                failures += 1
                log_failure(f"pattern {job.event.pattern!r}", exc, failures)
                await self.drain.sleep(backoff_seconds(failures))
            except Exception as exc:
                errors += 1
                if errors >= MAX_ATTEMPTS:
                    failed = failed or exc
            else:
                return

    async def _give_up(self, job: ScanJob, exc: Exception) -> None:
        reason = (
            f"the walk of pattern {job.event.pattern!r} failed {MAX_ATTEMPTS} times: "
            f"{type(exc).__name__}: {exc}"
        )
        log.error("pattern from %s: %s", job.origin, reason)
        if self.dead_letters is not None:
            letter = event_letter(
                job.event.id.encode(), job.origin, job.event, reason, "handler_failed"
            )
            await self.dead_letters.put(f"pattern walk ({job.origin})", [letter])
        await self._done(job)

    async def _done(self, job: ScanJob) -> None:
        """Tell the job, and every one that joined it, that the walk is over; each told once
        (a callback that failed is called again after the next walk, those before it are not:
        an entry with several walks would otherwise be acknowledged before all of them ended)."""
        waiting = self._active.setdefault(job.key, [job.done])
        while waiting:
            await waiting[0]()
            waiting.pop(0)

    async def _walk(self, job: ScanJob) -> bool:
        """Apply the job to every matching key; False if a drain stopped it half way."""
        event = job.event
        pattern = event.pattern or ""
        started = last_report = time.monotonic()
        matched = removed = 0
        log.info("pattern %r from %s: walking the cache", pattern, job.origin)
        keys_counter = self._keys.labels(self.region, job.origin)
        removed_counter = self._removed.labels(self.region, job.origin)
        async for found in self.cache.scan(pattern, count=self.batch):
            keys = [key for key in found if not is_fence_key(key)]
            plan = Plan()
            plan_keys(plan, keys, event.op, event.version, job.origin, self.resolver)
            removed_now = await self.cache.apply(plan)
            removed += removed_now
            matched += len(keys)
            keys_counter.inc(len(keys))
            removed_counter.inc(removed_now)
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                _progress(pattern, job.origin, matched, removed, time.monotonic() - started)
                last_report = time.monotonic()
            await anyio.lowlevel.checkpoint()  # ordinary invalidations go between batches
            if self.drain.requested:
                log.info("pattern %r: stopped by drain; it runs again on restart", pattern)
                return False
        self._finished.labels(self.region, job.origin).inc()
        log.info(
            "pattern %r from %s: %d keys matched, %d removed, in %.1f s",
            pattern,
            job.origin,
            matched,
            removed,
            time.monotonic() - started,
            extra={
                "pattern": pattern,
                "origin": job.origin,
                "matched": matched,
                "removed": removed,
            },
        )
        return True


def _progress(pattern: str, origin: str, matched: int, removed: int, seconds: float) -> None:
    rate = matched / seconds if seconds > 0 else 0.0
    log.info(
        "pattern %r from %s: %d keys matched, %d removed so far, %.0f keys/s",
        pattern,
        origin,
        matched,
        removed,
        rate,
        extra={
            "pattern": pattern,
            "origin": origin,
            "matched": matched,
            "removed": removed,
            "keys_per_s": round(rate, 1),
        },
    )
