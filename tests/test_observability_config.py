"""The compose deployment, Prometheus rules and Grafana dashboard are valid and match the code.

Needs ``promtool`` (Debian: package ``prometheus``; scripts/bootstrap.sh installs it) and
``check-jsonschema`` (a test dependency).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from invalgw.config import RegionConfig
from invalgw.metrics import Metrics
from invalgw.ops.probe import ProbeMetrics
from tests.conftest import running

COMPOSE = Path(__file__).parent.parent / "compose"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")


def exported_names() -> set[str]:
    """Every sample name the gateway and the probe can export."""
    registry = CollectorRegistry()
    Metrics("r", registry)
    ProbeMetrics(registry, 0.25, 600)
    names = set()
    for metric in registry.collect():
        names.add(metric.name)
        suffixes = {
            "counter": ["_total"],
            "info": ["_info"],
            "histogram": ["_bucket", "_sum", "_count"],
        }.get(metric.type, [""])
        names.update(metric.name + suffix for suffix in suffixes)
    return names


def metric_names_in(expr: str) -> set[str]:
    """The gateway's own metrics and the process collectors' (CPU, memory) named in ``expr``."""
    return set(re.findall(r"\b(?:invalgw|process|python)_[a-z_]+", expr))


def test_compose_file_follows_the_compose_spec() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_region_files_are_valid_configs() -> None:
    from invalgw.config import load_config

    for path in sorted((COMPOSE / "regions").glob("*.toml")):
        config = load_config(path)
        assert config.metrics.host == "0.0.0.0"


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "config", "prometheus.yml"],
        cwd=COMPOSE / "prometheus",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_alert_has_a_passing_unit_test() -> None:
    rules = (COMPOSE / "prometheus" / "alerts.yml").read_text()
    tests = (COMPOSE / "prometheus" / "alerts.test.yml").read_text()
    alerts = set(re.findall(r"- alert: (\w+)", rules))
    tested = set(re.findall(r"alertname: (\w+)", tests))
    assert alerts
    assert alerts == tested
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", "alerts.test.yml"],
        cwd=COMPOSE / "prometheus",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_use_metrics_the_gateway_exports() -> None:
    rules = (COMPOSE / "prometheus" / "alerts.yml").read_text()
    used = metric_names_in(rules)
    assert used
    assert used <= exported_names()


def test_dashboard_queries_name_exported_metrics() -> None:
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "invalgw.json").read_text())
    assert dashboard["uid"] == "invalgw"
    exported = exported_names()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = metric_names_in(target["expr"])
            assert used, f"{panel['title']}: no metric of ours in {target['expr']}"
            assert used <= exported, f"{panel['title']}: {used - exported} not exported"


@needs_promtool
@pytest.mark.anyio
async def test_metrics_endpoint_passes_promtool(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    import anyio
    import msgspec

    from invalgw.dev.localredis import free_port

    port = free_port()
    with_metrics = {
        name: msgspec.structs.replace(
            config, metrics=msgspec.structs.replace(config.metrics, port=port)
        )
        if name == "us-east"
        else config
        for name, config in configs.items()
    }
    async with running(with_metrics):
        body = await anyio.to_thread.run_sync(fetch, f"http://127.0.0.1:{port}/metrics")
    assert b"invalgw_replication_lag_seconds_bucket" in body
    result = await anyio.run_process([str(PROMTOOL), "check", "metrics"], input=body, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a local test URL
        body: bytes = response.read()
        return body
