"""The arithmetic and the report of ``invalgw bench``: percentiles, ratios, targets, the table.

Pure functions and structs, no I/O, so they are unit-tested on their own. The JSON report is the
msgspec encoding of :class:`Report`; its field names are part of what ``--json`` promises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

GATEWAY = "gateway"
NAIVE = "naive"


class Percentiles(msgspec.Struct, frozen=True, kw_only=True):
    """Latencies to one region, in milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


class Throughput(msgspec.Struct, frozen=True, kw_only=True):
    """N invalidations produced as fast as possible; timed until they are gone everywhere."""

    system: str
    invalidations: int
    keys_per_invalidation: int
    produce_seconds: float
    """How long the pipelined producer took to XADD all of them."""
    seconds: float
    """From the first XADD until the keys were gone in every region."""
    per_region_seconds: dict[str, float]
    """From the first XADD until the keys were gone in that region."""
    cpu_seconds: dict[str, float] = {}
    """CPU time each process of the system (and each redis-server) used in that interval:
    a figure that other load on the machine disturbs far less than the rate."""

    @property
    def cpu_us_per_invalidation(self) -> dict[str, float]:
        return {
            name: seconds / self.invalidations * 1e6 for name, seconds in self.cpu_seconds.items()
        }

    @property
    def rate(self) -> float:
        return self.invalidations / self.seconds if self.seconds > 0 else 0.0


class Latency(msgspec.Struct, frozen=True, kw_only=True):
    """From each XADD (producer's send time) to its keys' ``del`` events in each region."""

    system: str
    offered_rate: float
    achieved_rate: float
    """What the paced producer really sent, per second of its run."""
    seconds: float
    measured: int
    """Invalidations sent after the warm-up; the percentiles are over these."""
    per_region: dict[str, Percentiles]
    missing: dict[str, int]
    """Measured invalidations whose keys were never seen gone in that region (should be 0)."""
    cpu_share: dict[str, float] = {}
    """Share of one CPU each process (and each redis-server) used while the producer ran."""


class SystemResult(msgspec.Struct, frozen=True, kw_only=True):
    throughput: Throughput | None = None
    latency: Latency | None = None


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    nproc: int
    cpu_model: str
    python: str
    redis_server: str
    redis_py: str
    hiredis: str
    msgspec: str
    platform: str


class Ratios(msgspec.Struct, frozen=True, kw_only=True):
    """Gateway compared with the naive baseline of the same run."""

    throughput: float | None
    """Gateway invalidations per second / naive invalidations per second."""
    p50: dict[str, float]
    """Per peer region: naive p50 / gateway p50 (above 1: the gateway is faster)."""
    p99: dict[str, float]


class Target(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    met: bool
    detail: str


class Report(msgspec.Struct, frozen=True, kw_only=True):
    command: str
    machine: Machine
    origin: str
    peers: list[str]
    results: dict[str, SystemResult]
    ratios: Ratios | None
    targets: list[Target]
    load_average: tuple[float, float] | None = None
    """The host's 1-minute load average when the run started and when it ended: above the CPU
    count, other work competed with the run and every figure is worse than the code's best."""


def percentile(ordered: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ascending ``ordered`` values, by nearest rank."""
    if not ordered:
        raise ValueError("no samples")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is not between 0 and 100")
    rank = math.ceil(round(p * len(ordered) / 100, 9))  # round: 99.9 * 1000 / 100 > 999
    return ordered[max(0, rank - 1)]


def summarise(latencies_ms: Sequence[float]) -> Percentiles:
    """p50, p99, p99.9 and max of a sample (not necessarily sorted)."""
    ordered = sorted(latencies_ms)
    return Percentiles(
        count=len(ordered),
        p50_ms=percentile(ordered, 50),
        p99_ms=percentile(ordered, 99),
        p999_ms=percentile(ordered, 99.9),
        max_ms=ordered[-1],
    )


def gone_latencies(
    sent_at: Sequence[float], gone_at: dict[int, float], *, first: int = 0
) -> tuple[list[float], int]:
    """Milliseconds from ``sent_at[i]`` to ``gone_at[i]`` for ``i >= first``, and how many of
    those were never seen gone. Both times are on this host's monotonic clock, in seconds."""
    latencies: list[float] = []
    missing = 0
    for index in range(first, len(sent_at)):
        gone = gone_at.get(index)
        if gone is None:
            missing += 1
        else:
            latencies.append(max(0.0, gone - sent_at[index]) * 1000)
    return latencies, missing


def compare(
    gateway: SystemResult, naive: SystemResult | None, peers: Sequence[str]
) -> Ratios | None:
    if naive is None:
        return None
    throughput = None
    if gateway.throughput and naive.throughput and naive.throughput.rate > 0:
        throughput = gateway.throughput.rate / naive.throughput.rate
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    if gateway.latency and naive.latency:
        for peer in peers:
            ours, theirs = gateway.latency.per_region.get(peer), naive.latency.per_region.get(peer)
            if ours and theirs and ours.p50_ms > 0 and ours.p99_ms > 0:
                p50[peer] = theirs.p50_ms / ours.p50_ms
                p99[peer] = theirs.p99_ms / ours.p99_ms
    return Ratios(throughput=throughput, p50=p50, p99=p99)


MIN_RATE = 50_000
MIN_SPEEDUP = 5.0
MAX_P50_MS = 5.0
MAX_P99_MS = 25.0


def check_targets(
    gateway: SystemResult, naive: SystemResult | None, peers: Sequence[str]
) -> list[Target]:
    """The project's performance targets, each met or not, for this run."""
    targets: list[Target] = []
    if gateway.throughput:
        rate = gateway.throughput.rate
        targets.append(
            Target(
                name=f"throughput >= {MIN_RATE:,}/s",
                met=rate >= MIN_RATE,
                detail=f"{rate:,.0f}/s",
            )
        )
        if naive and naive.throughput and naive.throughput.rate > 0:
            speedup = rate / naive.throughput.rate
            targets.append(
                Target(
                    name=f"throughput >= {MIN_SPEEDUP:g}x naive",
                    met=speedup >= MIN_SPEEDUP,
                    detail=f"{speedup:.1f}x",
                )
            )
    if gateway.latency:
        for peer in peers:
            ours = gateway.latency.per_region.get(peer)
            missing = gateway.latency.missing.get(peer, 0)
            if ours is None:
                continue
            targets.append(
                Target(
                    name=f"{peer}: p50 < {MAX_P50_MS:g} ms, p99 < {MAX_P99_MS:g} ms, none missing",
                    met=ours.p50_ms < MAX_P50_MS and ours.p99_ms < MAX_P99_MS and not missing,
                    detail=f"p50 {ours.p50_ms:.2f} ms, p99 {ours.p99_ms:.2f} ms, {missing} missing",
                )
            )
            theirs = naive.latency.per_region.get(peer) if naive and naive.latency else None
            if theirs is not None:
                targets.append(
                    Target(
                        name=f"{peer}: p50 and p99 below naive",
                        met=ours.p50_ms < theirs.p50_ms and ours.p99_ms < theirs.p99_ms,
                        detail=f"naive p50 {theirs.p50_ms:.2f} ms, p99 {theirs.p99_ms:.2f} ms",
                    )
                )
    return targets


def render(report: Report) -> str:
    """The human-readable report: throughput, latency, ratios, targets."""
    lines: list[str] = []
    machine = report.machine
    lines.append(
        f"invalgw bench: {machine.nproc} CPUs ({machine.cpu_model}), Python {machine.python}, "
        f"redis-server {machine.redis_server}, redis-py {machine.redis_py}"
    )
    lines.append(f"origin {report.origin}, peers {', '.join(report.peers)}")
    if report.load_average is not None:
        start, end = report.load_average
        lines.append(
            f"load average {start:.1f} at the start, {end:.1f} at the end "
            f"({machine.nproc} CPUs: above that, other work competed with this run)"
        )
    systems = list(report.results.items())
    regions = [report.origin, *report.peers]

    throughputs = [(name, r.throughput) for name, r in systems if r.throughput]
    if throughputs:
        lines += ["", "Throughput (2 keys per invalidation, gone in every region)"]
        header = ["system", "invalidations", "produce s", *(f"{r} s" for r in regions)]
        header += ["total s", "inval/s"]
        rows = [
            [
                name,
                f"{t.invalidations:,}",
                f"{t.produce_seconds:.2f}",
                *(f"{t.per_region_seconds.get(r, math.nan):.2f}" for r in regions),
                f"{t.seconds:.2f}",
                f"{t.rate:,.0f}",
            ]
            for name, t in throughputs
        ]
        lines += _table(header, rows)
        cpu = [(name, t.cpu_us_per_invalidation) for name, t in throughputs if t.cpu_seconds]
        if cpu:
            lines += ["", "CPU time per invalidation in that run (microseconds)"]
            for name, per_process in cpu:
                total = sum(per_process.values())
                parts = ", ".join(f"{proc} {us:.1f}" for proc, us in per_process.items())
                lines.append(f"  {name}: {total:.1f} in all; {parts}")

    latencies = [(name, r.latency) for name, r in systems if r.latency]
    if latencies:
        first = latencies[0][1]
        lines += [
            "",
            f"Latency, XADD to keys gone, at {first.offered_rate:,.0f}/s offered "
            f"for {first.seconds:g} s (ms)",
        ]
        header = ["system", "region", "achieved/s", "count", "p50", "p99", "p99.9", "max"]
        header.append("missing")
        rows = []
        for name, lat in latencies:
            for region in regions:
                pct = lat.per_region.get(region)
                if pct is None:
                    continue
                label = region if region != report.origin else f"{region} (local)"
                rows.append(
                    [
                        name,
                        label,
                        f"{lat.achieved_rate:,.0f}",
                        f"{pct.count:,}",
                        f"{pct.p50_ms:.2f}",
                        f"{pct.p99_ms:.2f}",
                        f"{pct.p999_ms:.2f}",
                        f"{pct.max_ms:.2f}",
                        str(lat.missing.get(region, 0)),
                    ]
                )
        lines += _table(header, rows)
        for name, lat in latencies:
            if lat.cpu_share:
                parts = ", ".join(f"{proc} {share:.0%}" for proc, share in lat.cpu_share.items())
                lines.append(f"  {name} CPU at that rate (share of one core): {parts}")

    if report.ratios is not None:
        ratios = report.ratios
        lines += ["", "Gateway vs naive"]
        if ratios.throughput is not None:
            lines.append(f"  throughput: {ratios.throughput:.1f}x the naive forwarder")
        for peer in ratios.p50:
            lines.append(
                f"  {peer}: naive p50 / gateway p50 = {ratios.p50[peer]:.1f}x, "
                f"naive p99 / gateway p99 = {ratios.p99[peer]:.1f}x"
            )
    if report.targets:
        lines += ["", "Targets"]
        for target in report.targets:
            lines.append(f"  [{'met' if target.met else 'MISSED'}] {target.name}: {target.detail}")
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  " + "  ".join([first, *rest])

    return [line(header), "  " + "  ".join("-" * w for w in widths), *map(line, rows)]
