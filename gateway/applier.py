"""Local apply: invalidations written in this region take effect in this region's cache at once."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gateway.cache import UNLINK_CHUNK, Cache
from gateway.clock import ServerClock
from gateway.deadletter import DeadLetter, DeadLetters
from gateway.gaps import Gaps
from gateway.groups import Entry, GroupReader
from gateway.lag import LagWindow, LinkStatus, ack_with_status, lag_counts
from gateway.metrics import Metrics
from proto import Invalidation, InvalidEntry, Limits, parse_entry

log = logging.getLogger(__name__)


def id_ms(entry_id: str | bytes) -> int:
    """The millisecond part of a stream ID: the origin Redis's clock at XADD."""
    if isinstance(entry_id, bytes):
        return int(entry_id.partition(b"-")[0])
    return int(entry_id.partition("-")[0])


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
    entries: Sequence[Entry],
    keys: Sequence[str],
    status_key: str,
    status: LinkStatus,
) -> int:
    """Unlink ``keys``, then acknowledge ``entries`` with ``status``. Returns how many keys existed.

    One transaction when the cache is the stream's Redis and the keys fit one UNLINK; otherwise
    the keys go first, in UNLINKs of :data:`UNLINK_CHUNK` keys that other clients can interleave
    with (a transaction would hold the Redis for the whole batch).
    """
    ids = [entry_id for entry_id, _ in entries]
    if cache.in_stream_redis and len(keys) <= UNLINK_CHUNK:
        return await ack_with_status(reader, ids, status_key, status, unlink=keys)
    removed = await cache.unlink(keys)
    await ack_with_status(reader, ids, status_key, status)
    return removed


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
    ) -> None:
        self.region = region
        self.reader = reader
        self.cache = cache
        self.dead_letters = dead_letters
        self.gaps = gaps
        self.limits = limits
        self.clock = clock
        self.status = status
        self.status_key = status_key
        self.window = LagWindow()
        self._lag = metrics.lag.labels(region, region)
        self._applied = metrics.applied.labels(region, region, "unlink")
        self._removed = metrics.keys_removed.labels(region, region)
        self._batch = metrics.batch_size.labels(region, "apply")

    async def __call__(self, entries: Sequence[Entry]) -> None:
        valid, dead, lost = parse_batch(entries, self.limits)
        await self.dead_letters.put(self.reader.stream, dead)
        if lost:
            await self.gaps.record(
                self.region,
                "local entries deleted before they were applied",
                after=lost[0].decode(),
                upto=lost[-1].decode(),
            )
        keys = [key for invalidation in valid for key in invalidation.keys]
        if valid:
            self.status.last_id = valid[-1].id
        removed = await apply_and_ack(
            self.cache, self.reader, entries, keys, self.status_key, self.status
        )
        self._record(valid, removed)

    def _record(self, valid: list[Invalidation], removed: int) -> None:
        self._batch.observe(len(valid))
        if not valid:
            return
        self._applied.inc(len(valid))
        self._removed.inc(removed)
        lags = lag_counts([invalidation.id for invalidation in valid], self.clock.now_ms())
        self._lag.observe_counts([(lag / 1000, count) for lag, count in lags])
        self.window.add_counts(lags)
        self.status.applied += len(valid)
