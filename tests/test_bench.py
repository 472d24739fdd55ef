"""``invalgw bench``: its arithmetic, and that a run reports, and cleans up, even on Ctrl-C.

Timings are never asserted: the benchmark is a tool, not a timed test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from invalgw.config import parse_config
from invalgw.dev.benchload import keys_of
from invalgw.dev.benchrig import REGIONS, region_toml
from invalgw.dev.benchstats import (
    Latency,
    Machine,
    Percentiles,
    Report,
    SystemResult,
    Throughput,
    check_targets,
    compare,
    gone_latencies,
    percentile,
    render,
    summarise,
)


def test_percentile_is_nearest_rank() -> None:
    ordered = [float(n) for n in range(1, 1001)]  # 1 .. 1000
    assert percentile(ordered, 50) == 500
    assert percentile(ordered, 99) == 990
    assert percentile(ordered, 99.9) == 999
    assert percentile(ordered, 100) == 1000
    assert percentile(ordered, 0) == 1
    assert percentile([7.0], 99.9) == 7.0


def test_percentile_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)


def test_summarise_sorts_its_sample() -> None:
    summary = summarise([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (summary.count, summary.p50_ms, summary.max_ms) == (5, 3.0, 5.0)


def test_gone_latencies_skip_warmup_and_count_missing() -> None:
    sent = [10.0, 11.0, 12.0, 13.0]
    gone = {0: 10.5, 1: 11.002, 3: 13.010}
    latencies, missing = gone_latencies(sent, gone, first=1)
    assert latencies == pytest.approx([2.0, 10.0])
    assert missing == 1  # invalidation 2 was never seen gone


def _latency(system: str, p50: float, p99: float, missing: int = 0) -> Latency:
    pct = Percentiles(count=100, p50_ms=p50, p99_ms=p99, p999_ms=p99, max_ms=p99)
    return Latency(
        system=system,
        offered_rate=5000,
        achieved_rate=4999,
        seconds=10,
        measured=100,
        per_region=dict.fromkeys(REGIONS, pct),
        missing=dict.fromkeys(REGIONS, missing),
    )


def _throughput(system: str, seconds: float) -> Throughput:
    return Throughput(
        system=system,
        invalidations=100_000,
        keys_per_invalidation=2,
        produce_seconds=0.5,
        seconds=seconds,
        per_region_seconds=dict.fromkeys(REGIONS, seconds),
    )


def test_ratios_and_targets_compare_with_the_naive_run() -> None:
    peers = list(REGIONS[1:])
    gateway = SystemResult(throughput=_throughput("gateway", 1.0), latency=_latency("g", 2, 10))
    naive = SystemResult(throughput=_throughput("naive", 10.0), latency=_latency("n", 4, 40))
    ratios = compare(gateway, naive, peers)
    assert ratios is not None
    assert ratios.throughput == pytest.approx(10.0)
    assert ratios.p50 == dict.fromkeys(peers, 2.0)
    assert ratios.p99 == dict.fromkeys(peers, 4.0)
    assert all(target.met for target in check_targets(gateway, naive, peers))

    slow = SystemResult(throughput=_throughput("gateway", 5.0), latency=_latency("g", 6, 50, 1))
    missed = [target.name for target in check_targets(slow, naive, peers) if not target.met]
    assert "throughput >= 50,000/s" in missed
    assert "throughput >= 5x naive" in missed
    assert any(name.startswith("eu-west: p50 <") for name in missed)
    assert compare(gateway, None, peers) is None


def test_render_shows_every_system_and_region() -> None:
    peers = list(REGIONS[1:])
    gateway = SystemResult(throughput=_throughput("gateway", 1.0), latency=_latency("g", 2, 10))
    naive = SystemResult(throughput=_throughput("naive", 10.0), latency=_latency("n", 4, 40))
    report = Report(
        command="invalgw bench",
        machine=Machine(
            nproc=2,
            cpu_model="cpu",
            python="3.11",
            redis_server="7.0",
            redis_py="8",
            hiredis="3",
            msgspec="0.19",
            platform="linux",
        ),
        origin=REGIONS[0],
        peers=peers,
        results={"gateway": gateway, "naive": naive},
        ratios=compare(gateway, naive, peers),
        targets=check_targets(gateway, naive, peers),
    )
    text = render(report)
    assert "100,000" in text
    assert "10.0x the naive forwarder" in text
    for region in REGIONS:
        assert region in text
    assert "MISSED" not in text


def test_generated_region_files_are_valid_configs() -> None:
    ports = {region: 7000 + n for n, region in enumerate(REGIONS)}
    for region in REGIONS:
        config = parse_config(tomllib.loads(region_toml(region, ports, batch_size=200)))
        assert config.region == region
        assert {peer.name for peer in config.peers} == set(REGIONS) - {region}
        assert config.gateway.batch_size == 200


def test_keys_follow_debug_populate_names() -> None:
    assert keys_of("p", 0) == ("p:0", "p:1")
    assert keys_of("p", 7) == ("p:14", "p:15")


def _bench(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "invalgw", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _processes_under(workdir: str) -> list[str]:
    """Command lines of running processes that mention ``workdir`` (servers, gateways...)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if workdir in cmdline:
            found.append(cmdline)
    return found


def _workdir(stderr_line: str) -> str:
    match = re.search(r"work directory (\S+)", stderr_line)
    assert match, stderr_line
    return match.group(1)


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="looks for leftovers in /proc")
def test_small_run_reports_json_and_leaves_nothing_running() -> None:
    bench = _bench(
        "--invalidations", "2000", "--rate", "500", "--duration", "1", "--warmup", "0.2", "--json"
    )
    out, err = bench.communicate(timeout=110)
    assert bench.returncode == 0, err
    report = json.loads(out)
    for system in ("gateway", "naive"):
        result = report["results"][system]
        assert result["throughput"]["invalidations"] == 2000
        assert set(result["throughput"]["per_region_seconds"]) == set(REGIONS)
        assert result["latency"]["missing"] == dict.fromkeys(REGIONS, 0)
        assert result["latency"]["per_region"]["ap-south"]["count"] == 500
    assert report["ratios"]["throughput"] > 0
    assert _processes_under(_workdir(err)) == []
    assert not Path(_workdir(err)).exists()


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="looks for leftovers in /proc")
def test_ctrl_c_stops_everything_the_bench_started() -> None:
    bench = _bench("--duration", "30", "--skip-naive")
    assert bench.stderr is not None
    first = bench.stderr.readline()
    workdir = _workdir(first)
    deadline = time.monotonic() + 60
    line = ""
    while "latency" not in line:  # gateways up, producer running
        assert time.monotonic() < deadline, "bench did not start its latency run"
        line = bench.stderr.readline()
        assert line, "bench exited early"
    assert _processes_under(workdir), "nothing was running to stop"
    os.kill(bench.pid, signal.SIGINT)
    _out, err = bench.communicate(timeout=60)
    assert bench.returncode == 130, err
    assert "interrupted" in err
    assert _processes_under(workdir) == []
