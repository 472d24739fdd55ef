"""The arithmetic and the report of ``invalgw bench``: percentiles, CPU per invalidation, medians
of the rounds, the comparison with the batched baseline, targets, the table.

Pure functions and structs, no I/O, so they are unit-tested on their own. The JSON report is the
msgspec encoding of :class:`Report`; its field names are part of what ``--json`` promises.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

import msgspec

GATEWAY = "gateway"
BATCHED = "batched"
REDIS_KIND = "redis-server"
PROXY_KIND = "wan-proxy"
TOTAL = "total"


class Percentiles(msgspec.Struct, frozen=True, kw_only=True):
    """Latencies to one region, in milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    """One load, run for every system: a throughput run, or a paced run when ``rate`` is set."""

    name: str
    description: str
    regions: int
    all_origins: bool = False
    """Every region produces its share at once (else only the first region produces)."""
    keys: int = 2
    """Keys per invalidation."""
    rate: float | None = None
    """Paced: invalidations offered per second, and latency measured; None: as fast as possible."""
    delay_ms: float = 0.0
    """One-way delay on every link between regions (a loopback WAN proxy), in ms."""
    partitions: int = 1
    """``[streams] partitions`` of every region; the producer writes each entry to its
    partition's stream (:func:`invalgw.proto.stream_for`)."""
    processes: int = 1
    """Gateway processes per region, sharing its partitions by lease (gateway only)."""


class Run(msgspec.Struct, frozen=True, kw_only=True):
    """One system through one scenario, on fresh Redis servers."""

    scenario: str
    system: str
    round: int
    regions: list[str]
    origins: list[str]
    keys_per_invalidation: int
    invalidations: int
    seconds: float
    """Throughput runs: from the first XADD until every key is gone in every region. Paced runs:
    how long the producer ran."""
    rate: float
    """Invalidations per second over ``seconds``."""
    offered_rate: float | None = None
    delay_ms: float = 0.0
    cpu_seconds: dict[str, float] = {}
    """CPU time (user + system) each process used over the run, by process name."""
    cpu_us: dict[str, float] = {}
    """CPU microseconds per invalidation by kind of process (the system's, ``redis-server``,
    ``wan-proxy``), and ``total``: the system's and the Redis servers' (not the proxies')."""
    origin_us: float | None = None
    """CPU microseconds per invalidation of the first origin region's process alone."""
    core_share: dict[str, float] = {}
    """Share of one core each process used over the run."""
    latency: dict[str, Percentiles] = {}
    """Paced runs: from each invalidation's scheduled XADD to its keys gone, by region."""
    missing: dict[str, int] = {}
    """Invalidations whose keys were not all seen gone in that region (should be 0)."""
    producer_late_ms: float | None = None
    """Paced runs: the longest the producer fell behind its schedule. The latency includes it
    (it counts from the schedule); large values mean the machine starved the producer."""


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """The median over the rounds of one system in one scenario."""

    scenario: str
    system: str
    rounds: int
    invalidations: int
    rate: float
    cpu_us: dict[str, float]
    origin_us: float | None
    origin_core_share: float | None
    latency: dict[str, Percentiles]
    missing: dict[str, int]
    """Summed over the rounds."""
    producer_late_ms: float | None = None
    cpu_vs_batched: float | None = None
    """Total CPU per invalidation / the batched baseline's, in the same scenario."""
    rate_vs_batched: float | None = None


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    nproc: int
    cpu_model: str
    python: str
    redis_server: str
    redis_py: str
    hiredis: str
    msgspec: str
    platform: str


class Target(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    met: bool
    detail: str


class Report(msgspec.Struct, frozen=True, kw_only=True):
    command: str
    machine: Machine
    scenarios: list[Scenario]
    runs: list[Run]
    summaries: list[Summary]
    targets: list[Target]
    load_average: tuple[float, float] | None = None
    """The host's 1-minute load average when the run started and when it ended: above the CPU
    count, other work competed with the run and every figure is worse than the code's best."""


def process_kind(name: str) -> str:
    """``redis-us-east`` -> ``redis-server``; ``gateway-us-east`` -> ``gateway``; a baseline's
    process -> ``forwarder``; ``wan-proxy-eu-west`` -> ``wan-proxy``."""
    if name.startswith("redis-"):
        return REDIS_KIND
    if name.startswith(PROXY_KIND + "-"):
        return PROXY_KIND
    if name.startswith(GATEWAY + "-"):
        return GATEWAY
    return "forwarder"


def cpu_per_invalidation(cpu_seconds: dict[str, float], invalidations: int) -> dict[str, float]:
    """CPU microseconds per invalidation by kind of process, and their ``total`` (the system's
    processes and the Redis servers; a WAN proxy stands in for the network, so it is apart)."""
    by_kind: dict[str, float] = {}
    for name, seconds in cpu_seconds.items():
        kind = process_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds / invalidations * 1e6
    by_kind[TOTAL] = sum(us for kind, us in by_kind.items() if kind != PROXY_KIND)
    return by_kind


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each process used between two readings (processes in both)."""
    return {name: after[name] - before[name] for name in after if name in before}


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
    """Milliseconds from ``sent_at[i]`` (when invalidation ``i`` was scheduled to be sent) to
    ``gone_at[i]`` for ``i >= first``, and how many of those were never seen gone. Both times
    are on this host's monotonic clock, in seconds."""
    latencies: list[float] = []
    missing = 0
    for index in range(first, len(sent_at)):
        gone = gone_at.get(index)
        if gone is None:
            missing += 1
        else:
            latencies.append(max(0.0, gone - sent_at[index]) * 1000)
    return latencies, missing


def summarise_runs(runs: Sequence[Run]) -> list[Summary]:
    """One :class:`Summary` per scenario and system, in the order they first ran, each compared
    with the batched baseline of its scenario."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.scenario, run.system), []).append(run)
    plain = {key: _summary(group) for key, group in groups.items()}
    out = []
    for (scenario, system), summary in plain.items():
        baseline = plain.get((scenario, BATCHED))
        if baseline is not None and system != BATCHED:
            summary = msgspec.structs.replace(
                summary,
                cpu_vs_batched=_ratio(summary.cpu_us.get(TOTAL), baseline.cpu_us.get(TOTAL)),
                rate_vs_batched=_ratio(summary.rate, baseline.rate),
            )
        out.append(summary)
    return out


def _summary(runs: Sequence[Run]) -> Summary:
    first = runs[0]
    kinds = {kind for run in runs for kind in run.cpu_us}
    origin = f"{first.system}-{first.origins[0]}" if first.origins else ""
    shares = [run.core_share[origin] for run in runs if origin in run.core_share]
    regions = {region for run in runs for region in run.latency}
    return Summary(
        scenario=first.scenario,
        system=first.system,
        rounds=len(runs),
        invalidations=first.invalidations,
        rate=statistics.median(run.rate for run in runs),
        cpu_us={kind: _median(run.cpu_us.get(kind) for run in runs) for kind in sorted(kinds)},
        origin_us=_median(run.origin_us for run in runs),
        origin_core_share=statistics.median(shares) if shares else None,
        latency={
            region: _median_percentiles(
                [run.latency[region] for run in runs if region in run.latency]
            )
            for region in first.regions
            if region in regions
        },
        missing={
            region: sum(run.missing.get(region, 0) for run in runs) for region in first.regions
        },
        producer_late_ms=max(
            (run.producer_late_ms for run in runs if run.producer_late_ms is not None),
            default=None,
        ),
    )


def _median(values: Iterable[float | None]) -> float:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else math.nan


def _median_percentiles(samples: list[Percentiles]) -> Percentiles:
    return Percentiles(
        count=sum(p.count for p in samples),
        p50_ms=statistics.median(p.p50_ms for p in samples),
        p99_ms=statistics.median(p.p99_ms for p in samples),
        p999_ms=statistics.median(p.p999_ms for p in samples),
        max_ms=max(p.max_ms for p in samples),
    )


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or not theirs > 0 or math.isnan(ours):
        return None
    return ours / theirs


MAX_CPU_VS_BATCHED = 1.25
MIN_RATE_VS_BATCHED = 0.8
MAX_US_PER_PEER = 2.0
WAN_P50_SLACK_MS = 5.0
WAN_P99_SLACK_MS = 15.0
MAX_P50_MS = 3.0
MAX_P99_MS = 10.0
MODEST_RATE = 2000.0
MAX_CORE_SHARE = 0.15


def check_targets(summaries: Sequence[Summary], scenarios: Sequence[Scenario]) -> list[Target]:
    """The gateway's targets against the batched baseline, each met or not, where the run has
    the figures for it."""
    ours = {s.scenario: s for s in summaries if s.system == GATEWAY}
    by_name = {scenario.name: scenario for scenario in scenarios}
    targets: list[Target] = []
    for name in ("one-origin", "all-origins"):
        summary = ours.get(name)
        if summary is not None and summary.cpu_vs_batched is not None:
            targets.append(
                Target(
                    name=f"{name}: CPU per invalidation <= {MAX_CPU_VS_BATCHED:g}x batched",
                    met=summary.cpu_vs_batched <= MAX_CPU_VS_BATCHED,
                    detail=f"{summary.cpu_vs_batched:.2f}x ({summary.cpu_us[TOTAL]:.1f} us)",
                )
            )
    all_origins = ours.get("all-origins")
    if all_origins is not None and all_origins.rate_vs_batched is not None:
        targets.append(
            Target(
                name=f"all-origins: rate >= {MIN_RATE_VS_BATCHED:g}x batched",
                met=all_origins.rate_vs_batched >= MIN_RATE_VS_BATCHED,
                detail=f"{all_origins.rate_vs_batched:.2f}x ({all_origins.rate:,.0f}/s)",
            )
        )
    targets += _per_peer_target(ours, by_name)
    for name, (p50_max, p99_max) in _latency_limits(by_name).items():
        summary = ours.get(name)
        if summary is not None:
            targets += _latency_targets(summary, p50_max, p99_max)
    targets += _modest_rate_targets(ours, by_name)
    targets += scaling_targets(ours)
    return targets


SCALING_TWO, SCALING_ONE = "scaling-p4x2", "scaling-p4x1"
SCALING_P1, SCALING_P8 = "scaling-p1x1", "scaling-p8x1"
MIN_TWO_PROCESS_RATIO = 1.5
"""Target: a region's rate with 2 gateway processes / with 1 (P = 4)."""
MAX_PARTITION_CPU_GROWTH = 1.15
"""Target: the gateways' CPU per invalidation at P = 8 / at P = 1 (one process)."""


def scaling_targets(ours: dict[str, Summary]) -> list[Target]:
    """The scaling scenario's two figures, where the run has them: the rate with 2 processes
    over the rate with 1, and the gateways' CPU per invalidation at P = 8 over P = 1."""
    targets = []
    one, two = ours.get(SCALING_ONE), ours.get(SCALING_TWO)
    if one is not None and two is not None and one.rate > 0:
        ratio = two.rate / one.rate
        targets.append(
            Target(
                name=f"scaling: rate with 2 processes >= {MIN_TWO_PROCESS_RATIO:g}x 1 (P = 4)",
                met=ratio >= MIN_TWO_PROCESS_RATIO,
                detail=f"{ratio:.2f}x ({two.rate:,.0f}/s vs {one.rate:,.0f}/s)",
            )
        )
    p1, p8 = ours.get(SCALING_P1), ours.get(SCALING_P8)
    if p1 is not None and p8 is not None:
        name = (
            "scaling: gateway CPU per invalidation at P = 8 "
            f"<= {MAX_PARTITION_CPU_GROWTH:g}x P = 1 (1 process)"
        )
        at_1, at_8 = p1.cpu_us.get(GATEWAY, 0.0), p8.cpu_us.get(GATEWAY, 0.0)
        if at_1 > 0:
            growth = at_8 / at_1
            detail = f"{growth:.2f}x ({at_8:.1f} us vs {at_1:.1f} us)"
            targets.append(Target(name=name, met=growth <= MAX_PARTITION_CPU_GROWTH, detail=detail))
        else:  # CPU time is read in clock ticks (10 ms): a tiny run may show none
            detail = "no CPU time measured at P = 1: too few invalidations (raise --n)"
            targets.append(Target(name=name, met=False, detail=detail))
    return targets


def _modest_rate_targets(ours: dict[str, Summary], scenarios: dict[str, Scenario]) -> list[Target]:
    """The origin's gateway at a modest paced rate (any paced scenario run at that rate)."""
    targets = []
    for name, summary in ours.items():
        share = summary.origin_core_share
        if scenarios[name].rate == MODEST_RATE and share is not None:
            targets.append(
                Target(
                    name=f"{name}: the origin's gateway at {MODEST_RATE:,.0f}/s uses "
                    f"<= {MAX_CORE_SHARE:g} of a core",
                    met=share <= MAX_CORE_SHARE,
                    detail=f"{share:.2f}",
                )
            )
    return targets


def _per_peer_target(ours: dict[str, Summary], scenarios: dict[str, Scenario]) -> list[Target]:
    three, five = ours.get("one-origin"), ours.get("five-regions")
    if three is None or five is None or three.origin_us is None or five.origin_us is None:
        return []
    added = scenarios["five-regions"].regions - scenarios["one-origin"].regions
    per_peer = (five.origin_us - three.origin_us) / added
    return [
        Target(
            name=f"origin's CPU per added peer <= {MAX_US_PER_PEER:g} us per invalidation",
            met=per_peer <= MAX_US_PER_PEER,
            detail=f"{per_peer:.1f} us ({three.origin_us:.1f} -> {five.origin_us:.1f})",
        )
    ]


def _latency_limits(scenarios: dict[str, Scenario]) -> dict[str, tuple[float, float]]:
    limits = {}
    if "wan-latency" in scenarios:
        delay = scenarios["wan-latency"].delay_ms
        limits["wan-latency"] = (delay + WAN_P50_SLACK_MS, delay + WAN_P99_SLACK_MS)
    if "latency" in scenarios:
        limits["latency"] = (MAX_P50_MS, MAX_P99_MS)
    return limits


def _latency_targets(summary: Summary, p50_max: float, p99_max: float) -> list[Target]:
    targets = []
    for region, pct in list(summary.latency.items())[1:]:  # the peers, not the origin
        missing = summary.missing.get(region, 0)
        targets.append(
            Target(
                name=f"{summary.scenario}, {region}: p50 <= {p50_max:g} ms, "
                f"p99 <= {p99_max:g} ms, none missing",
                met=pct.p50_ms <= p50_max and pct.p99_ms <= p99_max and not missing,
                detail=f"p50 {pct.p50_ms:.1f} ms, p99 {pct.p99_ms:.1f} ms, {missing} missing",
            )
        )
    return targets


def render(report: Report) -> str:
    """The human-readable report: throughput and CPU, latency, targets."""
    machine = report.machine
    lines = [
        f"invalgw bench: {machine.nproc} CPUs ({machine.cpu_model}), Python {machine.python}, "
        f"redis-server {machine.redis_server}, redis-py {machine.redis_py}"
    ]
    if report.load_average is not None:
        start, end = report.load_average
        lines.append(
            f"load average {start:.1f} at the start, {end:.1f} at the end "
            f"({machine.nproc} CPUs: above that, other work competed with this run)"
        )
    by_name = {scenario.name: scenario for scenario in report.scenarios}
    rounds = max((s.rounds for s in report.summaries), default=1)
    median = f", median of {rounds} rounds" if rounds > 1 else ""
    throughput = [s for s in report.summaries if by_name[s.scenario].rate is None]
    if throughput:
        lines += [
            "",
            f"Throughput: as fast as possible, until every key is gone everywhere{median}",
        ]
        lines += [
            "  CPU: microseconds of CPU per invalidation of the gateways' or forwarders'",
            "  processes, the redis-servers, both, and the (first) origin's process alone;",
            "  vs batched: this / the batched forwarder's in the same scenario",
        ]
        lines += _table(_THROUGHPUT_HEADER, [_throughput_row(s, by_name) for s in throughput])
    paced = [s for s in report.summaries if by_name[s.scenario].rate is not None]
    if paced:
        lines += [
            "",
            f"Latency: ms from each invalidation's scheduled XADD to its keys gone{median}",
            "  origin core: share of one core the origin's process used while the producer ran;",
            "  CPU all: microseconds per invalidation of every process and redis-server, as above;",
            "  producer late: ms the producer fell behind its schedule at worst (in the latency)",
        ]
        lines += _table(_LATENCY_HEADER, [row for s in paced for row in _latency_rows(s, by_name)])
    if report.targets:
        lines += ["", "Targets"]
        for target in report.targets:
            lines.append(f"  [{'met' if target.met else 'MISSED'}] {target.name}: {target.detail}")
    return "\n".join(lines) + "\n"


_THROUGHPUT_HEADER = [
    "scenario",
    "system",
    "invalidations",
    "inval/s",
    "rate vs batched",
    "CPU gw/fwd",
    "CPU redis",
    "CPU all",
    "CPU vs batched",
    "CPU origin",
    "missing",
]
_LATENCY_HEADER = [
    "scenario",
    "system",
    "offered/s",
    "delay ms",
    "region",
    "p50",
    "p99",
    "p99.9",
    "max",
    "missing",
    "origin core",
    "CPU all",
    "producer late",
]


def _throughput_row(summary: Summary, scenarios: dict[str, Scenario]) -> list[str]:
    cpu = summary.cpu_us
    processes = sum(us for kind, us in cpu.items() if kind not in (REDIS_KIND, PROXY_KIND, TOTAL))
    return [
        _scenario_label(scenarios[summary.scenario]),
        summary.system,
        f"{summary.invalidations:,}",
        f"{summary.rate:,.0f}",
        _times(summary.rate_vs_batched),
        f"{processes:.1f}",
        f"{cpu.get(REDIS_KIND, math.nan):.1f}",
        f"{cpu.get(TOTAL, math.nan):.1f}",
        _times(summary.cpu_vs_batched),
        "" if summary.origin_us is None else f"{summary.origin_us:.1f}",
        str(sum(summary.missing.values())),
    ]


def _latency_rows(summary: Summary, scenarios: dict[str, Scenario]) -> list[list[str]]:
    scenario = scenarios[summary.scenario]
    rows = []
    for n, (region, pct) in enumerate(summary.latency.items()):
        first = n == 0
        rows.append(
            [
                scenario.name if first else "",
                summary.system if first else "",
                f"{scenario.rate or 0:,.0f}" if first else "",
                f"{scenario.delay_ms:g}" if first else "",
                f"{region} (origin)" if first else region,
                f"{pct.p50_ms:.1f}",
                f"{pct.p99_ms:.1f}",
                f"{pct.p999_ms:.1f}",
                f"{pct.max_ms:.1f}",
                str(summary.missing.get(region, 0)),
                _share(summary.origin_core_share) if first else "",
                f"{summary.cpu_us.get(TOTAL, math.nan):.1f}" if first else "",
                _late(summary.producer_late_ms) if first else "",
            ]
        )
    return rows


def _scenario_label(scenario: Scenario) -> str:
    return scenario.name


def _times(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def _late(ms: float | None) -> str:
    return "" if ms is None else f"{ms:.1f}"


def _share(share: float | None) -> str:
    return "" if share is None else f"{share:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  " + "  ".join([first, *rest])

    return [line(header), "  " + "  ".join("-" * w for w in widths), *map(line, rows)]
