"""invalgw probe: the SLO measured from outside, against three regions' real gateways."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest
from prometheus_client import generate_latest

from invalgw.config import RegionConfig
from invalgw.ops.probe import Prober, ProbeResult, SloWindow, format_duration, format_percent
from tests.conftest import running, write_config


@pytest.mark.anyio
async def test_probe_measures_convergence_in_every_region(
    configs: dict[str, RegionConfig],
) -> None:
    async with running(configs):
        prober = Prober(list(configs.values()), threshold_s=5.0, window_s=600, timeout_s=10)
        try:
            results = [await prober.probe_once(config) for config in configs.values()]
        finally:
            await prober.aclose()
    assert [r.origin for r in results if r is not None] == list(configs)
    assert all(r is not None and r.seconds is not None and r.seconds < 5 for r in results)
    assert prober.window.statement(5.0) == (
        "100% of invalidations applied in every region within 5 s over the last 10 minutes "
        "(3 probes)"
    )
    exported = generate_latest(prober.registry).decode()
    assert 'invalgw_probe_slo_ratio{threshold_seconds="5",window_seconds="600"} 1.0' in exported
    assert 'invalgw_probe_convergence_seconds_count{origin="eu-west"} 1.0' in exported


@pytest.mark.anyio
async def test_probe_reports_a_region_whose_gateway_is_down(
    configs: dict[str, RegionConfig],
) -> None:
    """With ap-south's gateway stopped, canaries from us-east never leave ap-south's cache."""
    async with running(configs, "us-east", "eu-west"):
        prober = Prober(list(configs.values()), threshold_s=0.25, window_s=600, timeout_s=1)
        try:
            result = await prober.probe_once(configs["us-east"])
        finally:
            await prober.aclose()
    assert result is not None
    assert result.seconds is None
    assert prober.failures == 1
    assert prober.window.statement(0.25).startswith("0% of invalidations")


@pytest.mark.parametrize(
    ("ratio", "text"),
    [
        (1.0, "100%"),
        (0.9999, "99.99%"),
        (0.99995, "99.995%"),
        (0.975, "97.5%"),
        (0.999999, "99.9999%"),
        (0.0, "0%"),
    ],
)
def test_percentages_are_never_rounded_up_to_100(ratio: float, text: str) -> None:
    assert format_percent(ratio) == text


def test_window_keeps_only_recent_probes() -> None:
    window = SloWindow(window_s=60)
    window.add(ProbeResult("a", started=0.0, seconds=0.1))
    window.add(ProbeResult("a", started=30.0, seconds=None))
    assert window.ratio_within(0.25) == 0.5
    window.add(ProbeResult("a", started=100.0, seconds=0.2))
    assert len(window) == 1
    assert window.ratio_within(0.25) == 1.0
    assert format_duration(0.25) == "250 ms"
    assert format_duration(600) == "10 minutes"


@pytest.mark.anyio
async def test_probe_watches_each_region_s_cache_not_its_stream_redis(
    configs: dict[str, RegionConfig],
) -> None:
    """A region whose cache is another Redis (here: another database) is probed there."""
    import msgspec

    from invalgw.config import CacheEndpoint

    separate = {
        name: msgspec.structs.replace(
            config, cache=CacheEndpoint(url=config.redis.url.rsplit("/", 1)[0] + "/2")
        )
        for name, config in configs.items()
    }
    async with running(separate):
        prober = Prober(list(separate.values()), threshold_s=5.0, window_s=600, timeout_s=10)
        try:
            result = await prober.probe_once(separate["eu-west"])
        finally:
            await prober.aclose()
    assert result is not None
    assert result.seconds is not None


@pytest.mark.anyio
async def test_probe_json_prints_one_object_per_report(
    configs: dict[str, RegionConfig], tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "invalgw", "probe", "--json", "--rounds", "3"]
    argv += ["--interval-ms", "50", "--report-every-s", "0", "--threshold-ms", "5000"]
    for name, config in configs.items():
        argv += ["--config", str(write_config(tmp_path / f"{name}.toml", config))]
    async with running(configs):
        result = await anyio.run_process(argv, check=False)
    assert result.returncode == 0, result.stderr.decode()
    reports = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [report["probes"] for report in reports] == [1, 2, 3]
    last = reports[-1]
    assert (last["ratio"], last["failures"]) == (1.0, 0)
    assert (last["threshold_seconds"], last["window_seconds"]) == (5.0, 600)
    assert last["statement"].startswith("100% of invalidations applied in every region within 5 s")
