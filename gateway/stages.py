"""The read → effect → acknowledge loop every pipeline stage runs, and the drain that stops it.

A stage (local apply, forward to a peer, apply a peer's mirror) is a :class:`GroupReader` plus a
handler that performs the effect and acknowledges. The loop survives Redis being unreachable:
it backs off (capped, jittered), rewinds to the pending entries and tries again, so nothing is
skipped. A drain interrupts the wait for new entries; a batch in hand is finished, except that a
handler may let the drain abandon a call whose repetition is harmless (see
:meth:`Drain.interruptible`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import anyio

from invalgw.connections import REDIS_ERRORS
from invalgw.functions import Fence, check_renewed
from invalgw.read import Entry, GroupReader

log = logging.getLogger(__name__)

Handler = Callable[[Sequence[Entry]], Awaitable[None]]


class Runnable(Protocol):
    """What the gateway runs in its task group: a stage, or a sender to a peer."""

    name: str

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = ...) -> None: ...


class Drain:
    """Asks every stage to stop after the batch in hand (first SIGTERM/SIGINT)."""

    def __init__(self) -> None:
        self.requested = False
        self._scopes: dict[anyio.CancelScope, float] = {}

    def request(self) -> None:
        self.requested = True
        for scope, grace_s in list(self._scopes.items()):
            _interrupt(scope, grace_s)

    @contextmanager
    def interruptible(self, grace_s: float = 0.0) -> Iterator[anyio.CancelScope]:
        """A cancel scope the drain cancels, ``grace_s`` after it starts.

        Wrap waits; wrap an effect only if doing it again after a restart is harmless (a batch to
        a peer, which recognises a batch it already has), never a local apply or acknowledgement.
        """
        with anyio.CancelScope() as scope:
            if self.requested:
                _interrupt(scope, grace_s)
            self._scopes[scope] = grace_s
            try:
                yield scope
            finally:
                self._scopes.pop(scope, None)

    async def sleep(self, seconds: float) -> None:
        with self.interruptible():
            await anyio.sleep(seconds)


def _interrupt(scope: anyio.CancelScope, grace_s: float) -> None:
    if grace_s <= 0:
        scope.cancel()
    else:
        scope.deadline = min(scope.deadline, anyio.current_time() + grace_s)


def backoff_seconds(failures: int, *, base_ms: int = 50, cap_ms: int = 5000) -> float:
    """Full-jitter exponential backoff: a random wait up to ``base * 2**failures``, capped."""
    return random.uniform(0, min(cap_ms, base_ms * 2 ** min(failures, 20))) / 1000


class Stage:
    """One pipeline stage: a reader, a handler, and what to do between batches."""

    def __init__(
        self,
        name: str,
        reader: GroupReader,
        handle: Handler,
        *,
        drain: Drain,
        on_error: Callable[[Exception], None],
        idle: Callable[[], Awaitable[None]] | None = None,
        prepare: Callable[[], Awaitable[None]] | None = None,
        on_claimed: Callable[[int], None] | None = None,
        on_lost: Callable[[list[bytes]], Awaitable[None]] | None = None,
        fence: Fence | None = None,
        claim_interval_ms: int,
        claim_idle_ms: int,
        backoff_cap_ms: int,
    ) -> None:
        self.name = name
        self.reader = reader
        self.handle = handle
        self.drain = drain
        self.on_error = on_error
        self.idle = idle
        self.prepare = prepare
        """Loads the handler's state from Redis before the first batch (retried like reads)."""
        self.claim_interval_ms = claim_interval_ms
        self.claim_idle_ms = claim_idle_ms
        self.backoff_cap_ms = backoff_cap_ms
        self.on_claimed = on_claimed
        """Told how many pending entries of other (dead) consumers were taken over."""
        self.on_lost = on_lost
        """Given the IDs of pending entries whose data was deleted before they were handled."""
        self.fence = fence
        """Reads wait while its lease is not known to be this process's (see :class:`Fence`)."""

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until drained. Reports ready once the group exists and start-up claims are done."""
        try:
            await self._run(task_status)
        finally:
            await self.reader.lane.close()

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = await until_ok(
            self._start,
            self.drain,
            name=self.name,
            on_error=self.on_error,
            backoff_cap_ms=self.backoff_cap_ms,
        )
        task_status.started()
        if not started:
            return
        next_claim = time.monotonic() + self.claim_interval_ms / 1000
        failures = 0
        interrupted = False
        while not self.drain.requested:
            try:
                if time.monotonic() >= next_claim:
                    await self._claim(self.claim_idle_ms)
                    next_claim = time.monotonic() + self.claim_interval_ms / 1000
                entries: list[Entry] = []
                check_renewed(self.fence)
                with self.drain.interruptible() as wait:
                    entries = await self.reader.read()
                interrupted = wait.cancelled_caught
                if entries:
                    await self.handle(entries)
                elif self.idle is not None and not self.drain.requested:
                    await self.idle()
                failures = 0
            except REDIS_ERRORS as exc:
                failures += 1
                self._failed(exc, failures)
                self.reader.rewind()
                await self.drain.sleep(backoff_seconds(failures, cap_ms=self.backoff_cap_ms))
        if interrupted:
            await self._finish_pending()
        log.info("%s: drained", self.name)

    async def _finish_pending(self) -> None:
        """Handle what a read cut short by the drain may have left in this consumer's pending list.

        Redis moves entries into the pending list when it sends them; if the drain cancelled the
        read after that, they would wait for the next start. One pass over the pending list
        (no blocking) handles them now, so a drained consumer leaves nothing pending.
        """
        self.reader.rewind()
        try:
            while entries := await self.reader.read():
                await self.handle(entries)
        except REDIS_ERRORS as exc:
            self.on_error(exc)
            log.warning("%s: pending entries left for the next start: %s", self.name, exc)

    async def _start(self) -> None:
        if self.prepare is not None:
            await self.prepare()
        if await self.reader.ensure_group():
            log.info("%s: created consumer group %r", self.name, self.reader.group)
        await self._claim(0)

    async def _claim(self, min_idle_ms: int) -> None:
        claimed, lost = await self.reader.claim(min_idle_ms)
        if claimed:
            log.info("%s: took over %d pending entries", self.name, claimed)
            if self.on_claimed is not None:
                self.on_claimed(claimed)
        if lost:
            log.warning(
                "%s: %d pending entries were deleted before they were handled (%s … %s)",
                self.name,
                len(lost),
                lost[0].decode(),
                lost[-1].decode(),
            )
            if self.on_lost is not None:
                await self.on_lost(lost)

    def _failed(self, exc: Exception, failures: int) -> None:
        self.on_error(exc)
        log_failure(self.name, exc, failures)


def log_failure(name: str, exc: Exception, failures: int) -> None:
    """Warn on the first failure in a row and now and then after; the rest at DEBUG."""
    level = logging.WARNING if failures in (1, 10) or failures % 100 == 0 else logging.DEBUG
    log.log(level, "%s: %s (attempt %d); retrying", name, exc or type(exc).__name__, failures)


async def until_ok(
    step: Callable[[], Awaitable[None]],
    drain: Drain,
    *,
    name: str,
    on_error: Callable[[Exception], None],
    backoff_cap_ms: int = 5000,
) -> bool:
    """Retry ``step`` on Redis errors with backoff until it succeeds (True) or a drain (False)."""
    failures = 0
    while not drain.requested:
        try:
            await step()
        except REDIS_ERRORS as exc:
            failures += 1
            on_error(exc)
            log_failure(name, exc, failures)
            await drain.sleep(backoff_seconds(failures, cap_ms=backoff_cap_ms))
        else:
            return True
    return False
