"""Lag bookkeeping per origin: what a region has applied from where, and how late.

Each region keeps one :class:`LinkStatus` per origin (itself included) in its Redis hash
``<namespace>:status``, as JSON, so ``invalgw lag`` and the demo can read it with no gateway
running and ``redis-cli HGETALL`` shows it to a person.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from invalgw.clock import ServerClock
from invalgw.connections import AsyncRedis
from invalgw.metrics import Metrics


class LinkStatus(msgspec.Struct, kw_only=True):
    """How one origin's invalidations are arriving in one region."""

    origin: str
    region: str
    epoch: str = ""
    last_id: str = "0-0"
    """Origin ID of the last invalidation applied here."""
    applied: int = 0
    """Invalidations applied here since the gateway started."""
    lag_p50_ms: float | None = None
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None
    """Over the last status interval; None when nothing was applied in it."""
    heartbeat_ms: int = 0
    """Origin clock when the newest envelope (batch or heartbeat) was sent."""
    heartbeat_age_ms: float | None = None
    """How old that envelope was when this status was written, on the origin's clock."""
    updated_ms: int = 0
    """This region's Redis clock when the status was written."""
    gaps: int = 0
    origin_clock_offset_ms: float = 0.0
    """The origin's Redis clock minus this region's, as last measured (0 for the region itself).
    A reader adds it to this region's clock to tell how old ``heartbeat_ms`` is now."""


def lag_counts(origin_ids: Sequence[str], now_ms: float) -> list[tuple[float, int]]:
    """Lags of invalidations with these origin IDs, seen at ``now_ms`` on the origin's clock,
    as (lag in ms, how many): one pair per distinct millisecond, and a busy batch holds dozens
    of invalidations per millisecond.

    IDs come in stream order, so each millisecond's run is found by bisection: a few steps per
    distinct millisecond, not a step per invalidation. (IDs out of order, which no stream gives,
    are still all counted, some at a neighbour's lag.)"""
    counts: list[tuple[float, int]] = []
    start, end = 0, len(origin_ids)
    while start < end:
        ms = origin_ids[start].partition("-")[0]
        if origin_ids[end - 1].startswith(ms + "-"):  # the rest is this millisecond
            stop = end
        else:  # after the IDs of ``ms``: "~" sorts after every digit
            stop = max(start + 1, bisect_right(origin_ids, ms + "-~", start, end))
        counts.append((max(0.0, now_ms - int(ms)), stop - start))
        start = stop
    return counts


class LagWindow:
    """Lags of the current interval, as (lag, how many) pairs; :meth:`take` summarises them
    exactly and starts a new interval.

    Invalidations arrive counted per origin millisecond (:func:`lag_counts`), so an interval
    holds a pair per distinct millisecond seen, not an entry per invalidation. Past
    :data:`MAX_PAIRS` (an interval far longer than the status period), lags are rounded to a
    tenth of a millisecond and merged."""

    MAX_PAIRS = 20_000

    def __init__(self) -> None:
        self._counts: list[tuple[float, int]] = []

    def add_counts(self, counts: Iterable[tuple[float, int]]) -> None:
        """Add ``count`` invalidations at each ``lag_ms``."""
        self._counts.extend(counts)
        if len(self._counts) > self.MAX_PAIRS:
            merged: dict[float, int] = {}
            for lag_ms, count in self._counts:
                rounded = round(lag_ms, 1)
                merged[rounded] = merged.get(rounded, 0) + count
            self._counts = list(merged.items())

    def take(self) -> tuple[float | None, float | None, float | None]:
        """(p50, p99, max) of the interval, then reset."""
        counts, self._counts = sorted(self._counts), []
        total = sum(count for _, count in counts)
        if not total:
            return None, None, None
        p50_at, p99_at = total // 2, min(total - 1, (total * 99) // 100)
        p50 = p99 = counts[-1][0]
        seen, found_p50 = 0, False
        for lag_ms, count in counts:
            seen += count
            if not found_p50 and seen > p50_at:
                p50, found_p50 = lag_ms, True
            if seen > p99_at:
                p99 = lag_ms
                break
        return p50, p99, counts[-1][0]


status_encoder = msgspec.json.Encoder()
status_decoder = msgspec.json.Decoder(LinkStatus)


@dataclass
class StatusSource:
    status: LinkStatus
    window: LagWindow
    origin_now_ms: Callable[[], float]


async def publish_status(
    client: AsyncRedis,
    key: str,
    sources: Sequence[StatusSource],
    *,
    local_clock: ServerClock,
    metrics: Metrics,
) -> None:
    """Summarise each origin's lag window into its status and save them all (one HSET)."""
    mapping: dict[Any, Any] = {}
    for source in sources:
        status = source.status
        status.lag_p50_ms, status.lag_p99_ms, status.lag_max_ms = source.window.take()
        if status.heartbeat_ms:
            status.heartbeat_age_ms = max(0.0, source.origin_now_ms() - status.heartbeat_ms)
            metrics.heartbeat_age.labels(status.region, status.origin).set(
                status.heartbeat_age_ms / 1000
            )
        local_now_ms = local_clock.now_ms()
        status.origin_clock_offset_ms = source.origin_now_ms() - local_now_ms
        status.updated_ms = int(local_now_ms)
        mapping[status.origin] = status_encoder.encode(status)
    if mapping:
        await client.hset(key, mapping=mapping)
