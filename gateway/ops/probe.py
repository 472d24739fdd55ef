"""``invalgw probe``: the invalidation SLO, measured from outside the gateways.

The probe plays a service: it caches a canary key in every region, invalidates it from one region
(one XADD, like any producer), and times how long until the key is gone in *every* region. It
rotates the origin region each round, keeps the results of a sliding window, and states the SLO
the way operators read it::

    99.95% of invalidations applied in every region within 250 ms over the last 10m (1200 probes)

Results are also exported as Prometheus metrics (``invalgw_probe_*``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from redis.asyncio.cluster import RedisCluster

from invalgw.cliargs import bind
from invalgw.config import RegionConfig, load_config
from invalgw.connections import REDIS_ERRORS, AsyncRedis, close, connect, connect_cache
from invalgw.metrics import LAG_BUCKETS, process_registry
from invalgw.producer import Invalidator

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.002


@dataclass(frozen=True)
class ProbeResult:
    origin: str
    started: float
    """Monotonic time the invalidation was written."""
    seconds: float | None
    """Until the key was gone in every region; None if it was not within the probe timeout."""


class SloWindow:
    """Probe results of the last ``window_s`` seconds."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._results: deque[ProbeResult] = deque()

    def add(self, result: ProbeResult) -> None:
        self._results.append(result)
        self._expire(result.started)

    def _expire(self, now: float) -> None:
        while self._results and self._results[0].started < now - self.window_s:
            self._results.popleft()

    def __len__(self) -> int:
        return len(self._results)

    def ratio_within(self, threshold_s: float) -> float | None:
        """Fraction of probes converged within ``threshold_s``; None before the first probe."""
        if not self._results:
            return None
        ok = sum(1 for r in self._results if r.seconds is not None and r.seconds <= threshold_s)
        return ok / len(self._results)

    def statement(self, threshold_s: float) -> str:
        ratio = self.ratio_within(threshold_s)
        if ratio is None:
            return "no probes yet"
        return (
            f"{format_percent(ratio)} of invalidations applied in every region within "
            f"{format_duration(threshold_s)} over the last {format_duration(self.window_s)} "
            f"({len(self)} probes)"
        )


def format_percent(ratio: float) -> str:
    """Percentages the way SLOs are read: 100%, 99.99%, 99.9%, 97.5% (never rounded up to 100)."""
    if ratio >= 1:
        return "100%"
    for digits in range(1, 5):
        text = f"{ratio * 100:.{digits}f}"
        if float(text) < 100:
            return text.rstrip("0").rstrip(".") + "%"
    return "99.9999%"


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:g} minutes"
    return f"{seconds / 3600:g} hours"


class ProbeMetrics:
    def __init__(self, registry: CollectorRegistry, threshold_s: float, window_s: float) -> None:
        self.convergence = Histogram(
            "invalgw_probe_convergence_seconds",
            "From a canary invalidation's XADD to its key being gone in every region.",
            ["origin"],
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "invalgw_probe_failures",
            "Canary invalidations not gone everywhere within the probe timeout.",
            ["origin"],
            registry=registry,
        )
        self.errors = Counter(
            "invalgw_probe_errors",
            "Probe rounds that could not run because a region's Redis did not answer.",
            ["region"],
            registry=registry,
        )
        self.slo_ratio = Gauge(
            "invalgw_probe_slo_ratio",
            "Fraction of probes in the window whose invalidation was gone everywhere in time.",
            ["threshold_seconds", "window_seconds"],
            registry=registry,
        ).labels(f"{threshold_s:g}", f"{window_s:g}")


class Prober:
    def __init__(
        self,
        configs: list[RegionConfig],
        *,
        threshold_s: float,
        window_s: float,
        timeout_s: float = 30.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.configs = configs
        self.threshold_s = threshold_s
        self.timeout_s = timeout_s
        self.window = SloWindow(window_s)
        self.registry = process_registry(registry)
        self.metrics = ProbeMetrics(self.registry, threshold_s, window_s)
        self.streams: dict[str, AsyncRedis] = {
            config.region: connect(config.redis, name=f"invalgw:probe:{config.region}")
            for config in configs
        }
        """Where the canary invalidation is written: each region's stream Redis."""
        self.caches: dict[str, AsyncRedis | RedisCluster] = {
            config.region: (
                self.streams[config.region]
                if config.cache is None
                else connect_cache(config.cache, name=f"invalgw:probe:{config.region}:cache")
            )
            for config in configs
        }
        """Where the canary key is cached and watched: each region's cache."""
        self._seq = itertools.count()
        self.failures = 0
        """Canaries not gone everywhere within the timeout, since the probe started."""

    async def aclose(self) -> None:
        for client in {id(c): c for c in (*self.streams.values(), *self.caches.values())}.values():
            await close(client)

    async def probe_once(self, origin: RegionConfig) -> ProbeResult | None:
        """One canary round from ``origin``; None if a region's Redis could not be reached."""
        # a cache key like any service's: the gateway's namespace is no producer's target
        key = f"{origin.streams.namespace}-probe:{origin.region}:{next(self._seq)}:{time.time_ns()}"
        try:
            for cache in self.caches.values():
                await cache.set(key, "canary", ex=max(60, int(self.timeout_s * 2)))
        except REDIS_ERRORS as exc:
            self.metrics.errors.labels(origin.region).inc()
            log.warning("probe: cannot cache the canary key: %s", exc)
            return None
        invalidator = Invalidator(
            self.streams[origin.region], stream=origin.streams.local, source="invalgw-probe"
        )
        started = time.monotonic()
        try:
            await invalidator.invalidate(key)
        except REDIS_ERRORS as exc:
            self.metrics.errors.labels(origin.region).inc()
            log.warning("probe: cannot write the invalidation in %s: %s", origin.region, exc)
            return None
        seconds = await self._until_gone(key, started)
        result = ProbeResult(origin.region, started, seconds)
        self.window.add(result)
        if seconds is None:
            self.failures += 1
            self.metrics.failures.labels(origin.region).inc()
        else:
            self.metrics.convergence.labels(origin.region).observe(seconds)
        ratio = self.window.ratio_within(self.threshold_s)
        if ratio is not None:
            self.metrics.slo_ratio.set(ratio)
        return result

    async def _until_gone(self, key: str, started: float) -> float | None:
        remaining = set(self.caches)
        deadline = started + self.timeout_s
        while remaining and time.monotonic() < deadline:
            for region in list(remaining):
                try:
                    if not await self.caches[region].exists(key):
                        remaining.discard(region)
                except REDIS_ERRORS:
                    self.metrics.errors.labels(region).inc()
            if remaining:
                await anyio.sleep(POLL_INTERVAL_S)
        if remaining:
            log.warning("probe: %s still cached in %s after %.0f s", key, remaining, self.timeout_s)
            return None
        return time.monotonic() - started

    async def run(
        self,
        *,
        interval_s: float,
        rounds: int | None,
        report_every_s: float,
        report: Callable[[Prober], None] | None = None,
    ) -> None:
        origins = itertools.cycle(self.configs)
        last_report = time.monotonic()
        done = 0
        while rounds is None or done < rounds:
            round_started = time.monotonic()
            await self.probe_once(next(origins))
            done += 1
            if time.monotonic() - last_report >= report_every_s or done == rounds:
                if report is None:
                    print(self.window.statement(self.threshold_s), flush=True)
                else:
                    report(self)
                last_report = time.monotonic()
            await anyio.sleep(max(0.0, interval_s - (time.monotonic() - round_started)))


@dataclass(frozen=True)
class ProbeOptions:
    config: tuple[str, ...]
    interval_ms: int = 1000
    threshold_ms: int = 250
    window_s: int = 600
    timeout_s: float = 30.0
    rounds: int | None = None
    report_every_s: float = 10.0
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    json: bool = False


class SloReport(msgspec.Struct, kw_only=True):
    """What ``probe --json`` prints, one object per line."""

    statement: str
    ratio: float | None
    threshold_seconds: float
    window_seconds: float
    probes: int
    failures: int


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "probe",
        help="measure the invalidation SLO from outside: canary keys gone in every region",
        description=(
            "Cache a canary key in every region, invalidate it from one region (one XADD, like "
            "any producer) and time how long until it is gone in every region, rotating the "
            "origin; print the SLO over a sliding window and export it to Prometheus. Exits 1 "
            "if a canary was not gone everywhere within --timeout-s."
        ),
    )
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="FILE",
        help="a region file; give one per region (e.g. --config regions/us-east.toml ...)",
    )
    parser.add_argument(
        "--interval-ms", type=int, default=1000, help="milliseconds between rounds (1000)"
    )
    parser.add_argument(
        "--threshold-ms", type=int, default=250, help="the SLO's time bound, milliseconds (250)"
    )
    parser.add_argument("--window-s", type=int, default=600, help="the SLO's window, seconds (600)")
    parser.add_argument(
        "--timeout-s", type=float, default=30.0, help="give a canary up to this many seconds (30)"
    )
    parser.add_argument("--rounds", type=int, help="stop after this many rounds (default: never)")
    parser.add_argument(
        "--report-every-s",
        type=float,
        default=10.0,
        help="print the SLO statement this often, seconds (10)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port"
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address the metrics port listens on (127.0.0.1; 0.0.0.0 in a container)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print each report as one JSON object per line instead of a sentence",
    )
    bind(parser, cmd_probe, ProbeOptions)


def cmd_probe(options: ProbeOptions) -> int:
    configs = [load_config(path) for path in options.config]
    return anyio.run(_probe, configs, options)


async def _probe(configs: list[RegionConfig], options: ProbeOptions) -> int:
    prober = Prober(
        configs,
        threshold_s=options.threshold_ms / 1000,
        window_s=options.window_s,
        timeout_s=options.timeout_s,
    )
    if options.metrics_port:
        start_http_server(options.metrics_port, options.metrics_host, registry=prober.registry)
    try:
        await prober.run(
            interval_s=options.interval_ms / 1000,
            rounds=options.rounds,
            report_every_s=options.report_every_s,
            report=_json_report if options.json else _sentence,
        )
    finally:
        with anyio.move_on_after(2, shield=True):
            await prober.aclose()
    return 1 if prober.failures else 0


def _sentence(prober: Prober) -> None:
    print(prober.window.statement(prober.threshold_s), flush=True)


def _json_report(prober: Prober) -> None:
    report = SloReport(
        statement=prober.window.statement(prober.threshold_s),
        ratio=prober.window.ratio_within(prober.threshold_s),
        threshold_seconds=prober.threshold_s,
        window_seconds=prober.window.window_s,
        probes=len(prober.window),
        failures=prober.failures,
    )
    print(msgspec.json.encode(report).decode(), flush=True)
