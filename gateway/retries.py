"""Keys on a cache node that does not answer, retried on their own.

On a Redis Cluster cache, the part of a batch that belongs to an unreachable node comes here with
the stream entries it belongs to. Those entries stay pending (held) while the rest of the batch,
and the stream after it, is applied and acknowledged: one sick node stalls only its own keys.
Each job is tried again with capped, jittered backoff until its node answers; then its entries
are acknowledged. A gateway that stops meanwhile leaves them pending, and the next one reads and
applies them again (every effect is idempotent).

Held entries are idle on purpose: the periodic XAUTOCLAIM of the same gateway neither counts nor
re-reads them, however long the node stays down (past ``claim_idle_ms`` too).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from invalgw.cache import Cache
from invalgw.connections import REDIS_ERRORS
from invalgw.effects import Plan
from invalgw.stages import Drain, backoff_seconds, log_failure

log = logging.getLogger(__name__)

MAX_KEYS_WAITING = 200_000
"""Keys held for retries at most; past it, a batch with keys on a down node fails as a whole and
its stage backs off (the stream waits, as it would without this isolation)."""

RETRY_BACKOFF_CAP_MS = 1000
"""A node's keys are applied at most about this long after it answers again."""


@dataclass
class RetryJob:
    plan: Plan
    """What is left to apply (keys on nodes that did not answer)."""
    done: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Called once the plan is applied: each acknowledges (a share of) a held entry."""
    removed: Callable[[int], None] = lambda _count: None
    """Told how many keys each retry removed."""


class CacheRetries:
    def __init__(self, cache: Cache, *, drain: Drain, max_keys: int = MAX_KEYS_WAITING) -> None:
        self.cache = cache
        self.drain = drain
        self.max_keys = max_keys
        self._jobs: list[RetryJob] = []
        self._waiting = 0
        self._wake = anyio.Event()

    @property
    def keys_waiting(self) -> int:
        return self._waiting

    def has_room(self, keys: int) -> bool:
        return self._waiting + keys <= self.max_keys

    def submit(self, job: RetryJob) -> None:
        self._jobs.append(job)
        self._waiting += len(job.plan.keys())
        self._wake.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Retry queued jobs until drained; what is left stays pending for the next gateway."""
        task_status.started()
        failures = 0
        while not self.drain.requested:
            if not self._jobs:
                self._wake = anyio.Event()
                with self.drain.interruptible():
                    await self._wake.wait()
                continue
            try:
                finished = await self._round()
            except REDIS_ERRORS as exc:
                finished = False
                log_failure("cache retries", exc, failures + 1)
            failures = 0 if finished else failures + 1
            if failures:
                await self.drain.sleep(backoff_seconds(failures, cap_ms=RETRY_BACKOFF_CAP_MS))

    async def _round(self) -> bool:
        """One try of every job, in order; True if none is left waiting."""
        probe = True  # the first job tries the nodes marked down; the others skip them
        for job in list(self._jobs):
            if job.plan:
                before = len(job.plan.keys())
                removed, job.plan = await self.cache.apply_parts(job.plan, skip_down=not probe)
                probe = False
                job.removed(removed)
                self._waiting -= before - len(job.plan.keys())
            if not job.plan:
                # acknowledged one by one; a job leaves only once all are (an acknowledgement
                # that failed is tried again next round, the keys are not applied again)
                while job.done:
                    await job.done[0]()
                    job.done.pop(0)
                self._jobs.remove(job)
        return not self._jobs
