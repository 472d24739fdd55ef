"""``invalgw bench``: its arithmetic, its baseline, and that a run reports every scenario and
cleans up, even on Ctrl-C.

Timings are never asserted: the benchmark is a tool, not a timed test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import redis

from invalgw.config import parse_config
from invalgw.dev.bench import SCALING, split
from invalgw.dev.benchload import keys_of, pace
from invalgw.dev.benchrig import BATCHED, REGIONS, STREAM, Mesh, region_toml
from invalgw.dev.benchstats import (
    Machine,
    Percentiles,
    Report,
    Run,
    Scenario,
    check_targets,
    cpu_per_invalidation,
    gone_latencies,
    percentile,
    render,
    summarise,
    summarise_runs,
)
from invalgw.proto import entry_fields

SCENARIOS = ("one-origin", "all-origins", "five-regions", "ten-keys", "wan-latency", "latency")


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


def test_a_producer_stall_shows_up_as_latency() -> None:
    """Latency counts from when each entry was due, not from when the producer sent it: a
    producer stalled for 100 ms sends 100 entries late, and their latency says so."""
    now = [0.0]
    sent_at: dict[int, float] = {}

    def send(first: int, end: int) -> None:
        for index in range(first, end):
            sent_at[index] = now[0]
        now[0] += 0.0001  # a write and its replies
        if first <= 500 < end:
            now[0] += 0.100  # the producer stalls (a busy machine, a slow reply)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    scheduled, elapsed, late = pace(send, 2000, 1000.0, clock=lambda: now[0], sleep=sleep)
    assert late > 0.099  # the producer knows it fell behind, and by how much
    assert scheduled[0] == 0.0
    assert scheduled[1999] == pytest.approx(1.999)
    assert elapsed >= 1.999
    gone = {index: at + 0.001 for index, at in sent_at.items()}  # gone 1 ms after each write
    latencies, missing = gone_latencies(scheduled, gone)
    assert missing == 0
    # the entries due while the producer was stalled waited up to the whole stall
    assert max(latencies) >= 100
    assert sum(1 for ms in latencies if ms > 50) >= 45
    # stamped with their write times instead, the stall would vanish from the figures
    naive, _ = gone_latencies([sent_at[i] for i in range(2000)], gone)
    assert max(naive) < 2


def _run(scenario: str, system: str, *, rate: float, cpu_us: float, origin_us: float) -> Run:
    invalidations = 100_000
    cpu = {f"{system}-us-east": origin_us * invalidations / 1e6, "redis-us-east": 0.5}
    cpu[f"{system}-eu-west"] = (cpu_us - origin_us) * invalidations / 1e6 - 0.5
    pct = Percentiles(count=10, p50_ms=27.0, p99_ms=35.0, p999_ms=36.0, max_ms=40.0)
    return Run(
        scenario=scenario,
        system=system,
        round=0,
        regions=list(REGIONS[:3]),
        origins=["us-east"],
        keys_per_invalidation=2,
        invalidations=invalidations,
        seconds=invalidations / rate,
        rate=rate,
        cpu_seconds=cpu,
        cpu_us=cpu_per_invalidation(cpu, invalidations),
        origin_us=origin_us,
        core_share={f"{system}-us-east": 0.1},
        latency=dict.fromkeys(REGIONS[:3], pct) if scenario == "wan-latency" else {},
        missing=dict.fromkeys(REGIONS[:3], 0),
    )


def test_cpu_is_counted_per_kind_of_process() -> None:
    cpu = {"gateway-us-east": 1.0, "gateway-eu-west": 0.5, "redis-us-east": 0.25}
    cpu["wan-proxy-eu-west"] = 2.0
    assert cpu_per_invalidation(cpu, 100_000) == {
        "gateway": pytest.approx(15.0),
        "redis-server": pytest.approx(2.5),
        "wan-proxy": pytest.approx(20.0),
        "total": pytest.approx(17.5),  # the proxy stands in for the network: not counted
    }
    assert "forwarder" in cpu_per_invalidation({"batched-us-east": 1.0}, 10)


def test_summaries_compare_with_the_batched_baseline_and_check_targets() -> None:
    scenarios = [
        Scenario(name="one-origin", description="", regions=3),
        Scenario(name="five-regions", description="", regions=5),
        Scenario(name="wan-latency", description="", regions=3, rate=2000, delay_ms=25),
    ]
    runs = [
        _run("one-origin", "gateway", rate=40_000, cpu_us=20.0, origin_us=10.0),
        _run("one-origin", BATCHED, rate=80_000, cpu_us=10.0, origin_us=4.0),
        _run("one-origin", "gateway", rate=60_000, cpu_us=24.0, origin_us=12.0),
        _run("one-origin", BATCHED, rate=60_000, cpu_us=8.0, origin_us=4.0),
        _run("five-regions", "gateway", rate=30_000, cpu_us=30.0, origin_us=14.0),
        _run("wan-latency", "gateway", rate=2000, cpu_us=50.0, origin_us=30.0),
    ]
    summaries = summarise_runs(runs)
    ours = summaries[0]
    assert (ours.scenario, ours.system, ours.rounds) == ("one-origin", "gateway", 2)
    assert ours.rate == 50_000
    assert ours.cpu_us["total"] == pytest.approx(22.0)
    assert ours.cpu_vs_batched == pytest.approx(22.0 / 9.0)
    assert ours.rate_vs_batched == pytest.approx(50_000 / 70_000)
    targets = {target.name: target for target in check_targets(summaries, scenarios)}
    assert not targets["one-origin: CPU per invalidation <= 1.25x batched"].met
    per_peer = targets["origin's CPU per added peer <= 2 us per invalidation"]
    assert per_peer.met
    assert per_peer.detail.startswith("1.5 us")
    assert targets["wan-latency, eu-west: p50 <= 30 ms, p99 <= 40 ms, none missing"].met
    assert "wan-latency, us-east: p50 <= 30 ms, p99 <= 40 ms, none missing" not in targets
    assert targets["wan-latency: the origin's gateway at 2,000/s uses <= 0.15 of a core"].met
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
        scenarios=scenarios,
        runs=runs,
        summaries=summaries,
        targets=list(targets.values()),
    )
    text = render(report)
    assert "median of 2 rounds" in text
    assert "2.44x" in text  # gateway CPU vs batched in one-origin
    assert "[MISSED] one-origin" in text
    for region in REGIONS[:3]:
        assert region in text


def test_scaling_targets_are_the_two_process_ratio_and_the_cpu_growth_from_p1_to_p8() -> None:
    runs = [  # the gateways' CPU is cpu_us - 5 (the Redis share _run gives)
        _run("scaling-p4x1", "gateway", rate=40_000, cpu_us=20.0, origin_us=10.0),
        _run("scaling-p4x2", "gateway", rate=70_000, cpu_us=22.0, origin_us=6.0),
        _run("scaling-p1x1", "gateway", rate=40_000, cpu_us=25.0, origin_us=12.0),
        _run("scaling-p8x1", "gateway", rate=40_000, cpu_us=29.0, origin_us=12.0),
    ]
    targets = {t.name: t for t in check_targets(summarise_runs(runs), SCALING)}
    ratio = targets["scaling: rate with 2 processes >= 1.5x 1 (P = 4)"]
    assert ratio.met
    assert ratio.detail == "1.75x (70,000/s vs 40,000/s)"
    growth = targets["scaling: gateway CPU per invalidation at P = 8 <= 1.15x P = 1 (1 process)"]
    assert not growth.met
    assert growth.detail == "1.20x (24.0 us vs 20.0 us)"


def test_generated_region_files_are_valid_configs() -> None:
    ports = {region: 7000 + n for n, region in enumerate(REGIONS)}
    for region in REGIONS:
        config = parse_config(tomllib.loads(region_toml(region, ports, batch_size=200)))
        assert config.region == region
        assert {peer.name for peer in config.peers} == set(REGIONS) - {region}
        assert config.gateway.batch_size == 200


def test_partitioned_region_files_give_every_process_its_own_consumer() -> None:
    ports = {region: 7000 + n for n, region in enumerate(REGIONS[:2])}
    config = parse_config(
        tomllib.loads(region_toml("us-east", ports, partitions=8, consumer="bench-1"))
    )
    assert config.streams.partitions == 8
    assert [peer.partitions for peer in config.peers] == [8]
    assert config.consumer == "bench-1"


def test_keys_follow_debug_populate_names() -> None:
    assert keys_of("p", 0) == ("p:0", "p:1")
    assert keys_of("p", 7) == ("p:14", "p:15")
    assert keys_of("p", 2, 3) == ("p:6", "p:7", "p:8")


def test_all_origins_share_the_invalidations() -> None:
    assert split(100_000, 3) == [33_334, 33_333, 33_333]
    assert split(2, 5) == [1, 1, 1, 1, 1]  # at least one each


def test_batched_forwarder_invalidates_every_key_in_every_region(tmp_path: Path) -> None:
    """The baseline is a real forwarder: every key of every invalidation, from every region,
    goes in every region, and every entry is acknowledged once its keys are gone."""
    with Mesh(tmp_path / "mesh", 3) as mesh:
        mesh.start_system(BATCHED)
        expected: set[bytes] = set()
        for n, origin in enumerate(mesh.regions):
            for index in range(700):  # more than one read's worth from the first region
                if n and index >= 50:
                    break
                keys = [f"{origin}:k:{index}", f"{origin}:k:{index}:b"]
                if index % 10 == 0:
                    keys.append(f"{origin}:with space:{index}")  # sent with a `sep`
                for client in mesh.clients.values():
                    client.mset(dict.fromkeys(keys, "cached"))
                mesh.clients[origin].xadd(STREAM, entry_fields(keys))  # type: ignore[arg-type]
                expected.update(key.encode() for key in keys)
        deadline = time.monotonic() + 60
        while any(client.dbsize() > _housekeeping(client) for client in mesh.clients.values()):
            mesh.check_alive()
            assert time.monotonic() < deadline, "keys left after 60 s"
            time.sleep(0.05)
        for region, client in mesh.clients.items():
            assert not any(client.exists(key) for key in list(expected)[:50]), region
            left = [key for key in client.scan_iter(count=1000) if key in expected]
            assert left == [], region
            while client.xpending(STREAM, "batched")["pending"]:
                assert time.monotonic() < deadline, f"{region}: entries left unacknowledged"
                time.sleep(0.05)


def _housekeeping(client: redis.Redis) -> int:
    """Keys that are not cache keys (the stream)."""
    return int(client.exists(STREAM))


def _bench(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """``invalgw bench`` with its work directory under ``tmp_path`` (TMPDIR)."""
    return subprocess.Popen(
        [sys.executable, "-m", "invalgw", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )


def _pids_under(workdir: str) -> dict[int, str]:
    """Running processes whose command line mentions ``workdir`` (servers, gateways...)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if workdir in cmdline:
            found[int(entry.name)] = cmdline
    return found


def _processes_under(workdir: str) -> list[str]:
    return list(_pids_under(workdir).values())


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="looks for leftovers in /proc")
def test_small_run_reports_json_for_every_scenario_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    out = tmp_path / "report.json"
    bench = _bench(
        tmp_path,
        *("--n", "600", "--rate", "400", "--wan-rate", "200", "--delay-ms", "5"),
        *("--duration", "0.5", "--warmup", "0.1", "--json", str(out)),
    )
    stdout, stderr = bench.communicate(timeout=300)
    assert bench.returncode == 0, stderr
    assert stderr == ""  # quiet when not on a terminal
    assert "Throughput" in stdout
    assert "Latency" in stdout
    report = json.loads(out.read_text())
    runs = {(run["scenario"], run["system"]): run for run in report["runs"]}
    assert set(runs) == {(name, system) for name in SCENARIOS for system in ("gateway", "batched")}
    for (scenario, system), run in runs.items():
        regions = REGIONS[:5] if scenario == "five-regions" else REGIONS[:3]
        assert run["regions"] == list(regions)
        assert run["missing"] == dict.fromkeys(regions, 0), (scenario, system)
        assert run["rate"] > 0
        assert run["invalidations"] > 0
        kind = "gateway" if system == "gateway" else "forwarder"
        assert {kind, "redis-server", "total"} <= set(run["cpu_us"]), (scenario, system)
        assert len([name for name in run["cpu_seconds"] if name.startswith("redis-")]) == len(
            regions
        )
        if scenario in ("wan-latency", "latency"):
            assert set(run["latency"]) == set(regions)
            assert run["latency"]["eu-west"]["count"] == (200 if scenario == "latency" else 100)
            assert run["offered_rate"] == (400 if scenario == "latency" else 200)
            assert run["producer_late_ms"] >= 0
        else:
            assert run["latency"] == {}
    assert runs[("all-origins", "gateway")]["origins"] == list(REGIONS[:3])
    assert runs[("ten-keys", "batched")]["keys_per_invalidation"] == 10
    assert runs[("wan-latency", "gateway")]["delay_ms"] == 5
    assert "wan-proxy" in runs[("wan-latency", "batched")]["cpu_us"]
    summaries = {(s["scenario"], s["system"]) for s in report["summaries"]}
    assert summaries == set(runs)
    assert any(t["name"].startswith("wan-latency, eu-west") for t in report["targets"])
    assert _processes_under(str(tmp_path)) == []
    assert [p for p in tmp_path.iterdir() if p.name.startswith("invalgw-bench-")] == []


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="looks for leftovers in /proc")
def test_scaling_reports_the_two_process_ratio_and_the_cpu_of_p8_against_p1(
    tmp_path: Path,
) -> None:
    out = tmp_path / "report.json"
    bench = _bench(tmp_path, "--scenario", "scaling", "--n", "2000", "--json", str(out))
    stdout, stderr = bench.communicate(timeout=300)
    assert bench.returncode == 0, stderr
    report = json.loads(out.read_text())
    runs = {run["scenario"]: run for run in report["runs"]}
    assert {run["system"] for run in report["runs"]} == {"gateway"}  # the gateway alone
    assert set(runs) == {"scaling-p4x1", "scaling-p4x2", "scaling-p1x1", "scaling-p8x1"}
    for name, run in runs.items():
        assert run["regions"] == list(REGIONS[:2])
        assert run["missing"] == dict.fromkeys(REGIONS[:2], 0), name
    two_processes = [n for n in runs["scaling-p4x2"]["cpu_seconds"] if n.startswith("gateway-")]
    assert len(two_processes) == 4  # 2 per region
    targets = {t["name"].split(":")[1].strip(): t for t in report["targets"]}
    ratio = targets["rate with 2 processes >= 1.5x 1 (P = 4)"]["detail"]
    growth = targets["gateway CPU per invalidation at P = 8 <= 1.15x P = 1 (1 process)"]["detail"]
    assert ratio in stdout
    assert growth in stdout
    assert _processes_under(str(tmp_path)) == []


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="looks for leftovers in /proc")
def test_ctrl_c_stops_everything_the_bench_started(tmp_path: Path) -> None:
    bench = _bench(tmp_path, "--scenario", "latency", "--duration", "60", "--systems", "gateway")
    deadline = time.monotonic() + 60
    while not any("benchload subscribe" in p for p in _processes_under(str(tmp_path))):
        assert bench.poll() is None, "bench exited early"
        assert time.monotonic() < deadline, "bench did not start its latency run"
        time.sleep(0.1)
    os.kill(bench.pid, signal.SIGINT)
    try:
        _out, err = bench.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(bench.pid, signal.SIGUSR1)  # the bench's stacks, on its stderr
        with contextlib.suppress(subprocess.TimeoutExpired):
            bench.communicate(timeout=5)  # what it writes is kept for the next call
        for pid in [bench.pid, *_pids_under(str(tmp_path))]:  # nothing left for the next test
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        _out, err = bench.communicate(timeout=10)
        pytest.fail(f"the bench did not stop within 60 s of Ctrl-C; where it was:\n{err}")
    assert bench.returncode == 130, err
    assert "interrupted" in err
    assert _processes_under(str(tmp_path)) == []


def test_unknown_scenario_is_a_clear_error(tmp_path: Path) -> None:
    bench = _bench(tmp_path, "--scenario", "one-origin,fastest")
    _out, err = bench.communicate(timeout=60)
    assert bench.returncode == 2
    assert "unknown scenario fastest" in err
    assert "wan-latency" in err


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="looks for leftovers in /proc")
def test_a_failed_run_says_why_and_leaves_nothing_running(tmp_path: Path) -> None:
    bench = _bench(tmp_path, "--scenario", "one-origin", "--n", "100", "--batch-size", "0")
    _out, err = bench.communicate(timeout=120)
    assert bench.returncode == 1
    assert "gateway-us-east exited" in err
    assert "batch_size" in err  # the gateway's own complaint, from its log
    assert _processes_under(str(tmp_path)) == []
