"""Prometheus metrics of one gateway. Labels are region names, never keys."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

import prometheus_client
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LAG_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class BatchHistogram(Collector):
    """A labelled Prometheus histogram that takes a whole batch of observations in one call.

    ``prometheus_client.Histogram.observe`` costs about a microsecond (a lock, a bucket search,
    two counters) and the gateway observes the lag of every invalidation it applies, tens of
    thousands a second. :meth:`HistogramSeries.observe_counts` takes the lock once per batch.
    Exported exactly like a ``Histogram`` of the same name (``_bucket``, ``_count``, ``_sum``).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.upper_bounds = [*buckets, float("inf")]
        self._le = [floatToGoString(bound) for bound in self.upper_bounds]  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, ...], HistogramSeries] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> HistogramSeries:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        with self._lock:
            series = self._series.get(values)
            if series is None:
                series = self._series[values] = HistogramSeries(self.upper_bounds, self._lock)
        return series

    def describe(self) -> Iterable[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            snapshot = [(labels, list(s.counts), s.sum) for labels, s in self._series.items()]
        for labels, counts, total in snapshot:
            cumulative, buckets = 0, []
            for le, count in zip(self._le, counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(labels), buckets, total)
        yield family


class HistogramSeries:
    """One label combination of a :class:`BatchHistogram`."""

    def __init__(self, upper_bounds: list[float], lock: threading.Lock) -> None:
        self._upper_bounds = upper_bounds
        self._lock = lock
        self.counts = [0] * len(upper_bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.observe_counts([(value, 1)])

    def observe_many(self, values: Iterable[float]) -> None:
        self.observe_counts([(value, 1) for value in values])

    def observe_counts(self, counts: Iterable[tuple[float, int]]) -> None:
        """Observe each ``value`` ``count`` times."""
        upper_bounds, buckets = self._upper_bounds, self.counts
        with self._lock:
            for value, count in counts:
                buckets[bisect_left(upper_bounds, value)] += count
                self.sum += value * count


def process_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """``registry`` (or a new one) with what every invalgw process exports besides its own
    metrics: ``process_*`` (CPU, resident memory, open fds), ``python_info``,
    ``python_gc_*`` and ``invalgw_build_info{version}``.

    Also turns off the ``_created`` series of counters and histograms for the whole process:
    Prometheus does not need them, and they double the series an operator scrolls through.
    """
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = registry or CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    from invalgw import __version__

    Info("invalgw_build", "The invalgw version this process runs.", registry=registry).info(
        {"version": __version__}
    )
    return registry


class Metrics:
    """Every metric the gateway exports, registered in ``registry`` (tests pass a fresh one)."""

    def __init__(self, region: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = process_registry(registry)
        self.region = region
        r = self.registry
        self.applied = Counter(
            "invalgw_invalidations_applied",
            "Invalidations applied in this region, by origin region and op.",
            ["region", "origin", "op"],
            registry=r,
        )
        self.keys_removed = Counter(
            "invalgw_keys_removed",
            "Keys that existed and were removed from this region's cache, by origin region.",
            ["region", "origin"],
            registry=r,
        )
        self.cache_redirects = Counter(
            "invalgw_cache_redirects",
            "Keys a cluster node refused because it does not serve their slot (moved) or serves "
            "it in part (ask: a migration), redone through the cluster client's redirections.",
            ["region", "kind"],
            registry=r,
        )
        self.forwarded = Counter(
            "invalgw_invalidations_forwarded",
            "Invalidations accepted by a peer region's Redis.",
            ["region", "peer"],
            registry=r,
        )
        self.duplicates = Counter(
            "invalgw_duplicate_batches",
            "Batches a peer already had (re-sent after a crash or a lost reply); not added again.",
            ["region", "peer"],
            registry=r,
        )
        self.dead_letters = Counter(
            "invalgw_dead_letters",
            "Entries moved to the dead-letter stream, by reason.",
            ["region", "reason"],
            registry=r,
        )
        self.groups_recreated = Counter(
            "invalgw_consumer_groups_recreated",
            "Consumer groups found missing (NOGROUP: Redis restarted or stream deleted) and "
            "created again, by stage (apply, to:<peer>, from:<peer>).",
            ["region", "group"],
            registry=r,
        )
        self.reclaimed = Counter(
            "invalgw_entries_reclaimed",
            "Pending entries taken over with XAUTOCLAIM (left by a crash or a dead consumer), "
            "by stage.",
            ["region", "group"],
            registry=r,
        )
        self.gaps = Counter(
            "invalgw_gaps",
            "Gaps recorded: invalidations from an origin that may never arrive here.",
            ["region", "origin"],
            registry=r,
        )
        self.redis_errors = Counter(
            "invalgw_redis_errors",
            "Failed calls to a Redis (after the client's own retries), by target region.",
            ["region", "target"],
            registry=r,
        )
        self.connection_errors = Counter(
            "invalgw_redis_connection_errors",
            "Every connection error or timeout on a call to a Redis, by target region, "
            "including those the client's own retries absorbed (a flapping link shows here).",
            ["region", "target"],
            registry=r,
        )
        self.retries = Counter(
            "invalgw_redis_retries",
            "Calls to a Redis the client tried again after a connection error, by target region.",
            ["region", "target"],
            registry=r,
        )
        self.pattern_keys = Counter(
            "invalgw_pattern_keys",
            "Keys matched and invalidated by pattern invalidations, by origin region.",
            ["region", "origin"],
            registry=r,
        )
        self.pattern_keys_removed = Counter(
            "invalgw_pattern_keys_removed",
            "Keys that existed and were removed (or given a soft expiry) by pattern "
            "invalidations, by origin region; with invalgw_pattern_keys_total, a walk's progress.",
            ["region", "origin"],
            registry=r,
        )
        self.pattern_invalidations = Counter(
            "invalgw_pattern_invalidations",
            "Pattern invalidations whose walk of the cache completed, by origin region.",
            ["region", "origin"],
            registry=r,
        )
        self.pattern_in_progress = Gauge(
            "invalgw_pattern_invalidations_in_progress",
            "Pattern invalidations queued or walking the cache.",
            ["region"],
            registry=r,
        )
        self.lag = BatchHistogram(
            "invalgw_replication_lag_seconds",
            "From the origin's XADD to the apply in this region, on the Redis server clocks.",
            ["region", "origin"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "invalgw_batch_size",
            "Invalidations per batch, by stage (apply, forward, mirror).",
            ["region", "stage"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.backlog = Gauge(
            "invalgw_backlog_entries",
            "Entries of the local stream not yet delivered to a peer (or applied locally).",
            ["region", "group"],
            registry=r,
        )
        self.heartbeat_age = Gauge(
            "invalgw_heartbeat_age_seconds",
            "Time since the newest envelope from an origin was sent, on the origin's clock.",
            ["region", "origin"],
            registry=r,
        )
        self.clock_offset = Gauge(
            "invalgw_clock_offset_seconds",
            "A peer's Redis clock minus this region's Redis clock, measured with TIME.",
            ["region", "peer"],
            registry=r,
        )
        self.lease_held = Gauge(
            "invalgw_lease_held",
            "1 while this gateway holds its region's lease and runs the stages; 0 as a standby.",
            ["region"],
            registry=r,
        )
        self.fenced = Counter(
            "invalgw_fenced_writes",
            "Acknowledgements and cursor moves the region's Redis refused because the lease of "
            "their stream (or partition) is another gateway's now: this one stalled past it and "
            "stops at its next renewal.",
            ["region"],
            registry=r,
        )
        self.fenced.labels(region)
        self.partitions_owned = Gauge(
            "invalgw_partitions_owned",
            "Partitions of the region's stream this gateway process holds the lease of and runs "
            "(a partitioned stream; sum over processes: the partition count).",
            ["region"],
            registry=r,
        )
        self.partition_reroutes = Counter(
            "invalgw_partition_reroutes",
            "Partitions this process now reaches on another cluster node, their slot (or a "
            "mirror stream's) having moved: after a node answered MOVED (cause moved: a "
            "resharding) or stayed unreachable (cause unreachable: a failover). Those it runs "
            "restart there at once.",
            ["region", "cause"],
            registry=r,
        )
        for cause in ("moved", "unreachable"):
            self.partition_reroutes.labels(region, cause)
        self.link_up = Gauge(
            "invalgw_link_up",
            "1 while the last attempt to reach a peer's Redis succeeded, else 0.",
            ["region", "peer"],
            registry=r,
        )
        self.conflated = Counter(
            "invalgw_conflated",
            "Key invalidations merged into another of the same key in the same batch: applied "
            "and sent once, with the strongest effect.",
            ["region"],
            registry=r,
        )
        self.conflated.labels(region)
        self.catch_ups = Counter(
            "invalgw_sender_catch_ups",
            "Times a sender read the local stream itself from its cursor (at start, after falling "
            "behind the in-memory feed, or after its peer failed) before joining the feed again.",
            ["region", "peer"],
            registry=r,
        )
        self.in_flight = Gauge(
            "invalgw_batches_in_flight",
            "Envelopes sent to a peer's Redis whose reply has not come back yet.",
            ["region", "peer"],
            registry=r,
        )

    def start_at_zero(self, origins: Iterable[str], reasons: Iterable[str]) -> None:
        """Export the labelled counters alerts watch at 0 from start-up, for the label values
        known now: ``increase()`` over a series that first appears at 1 sees no increase, so
        the first gap or dead letter would never alert."""
        for origin in origins:
            self.gaps.labels(self.region, origin)
        for reason in reasons:
            self.dead_letters.labels(self.region, reason)
