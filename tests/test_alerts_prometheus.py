"""The shipped alerts, proven on a real Prometheus server against three running gateways.

Prometheus (Debian's ``prometheus`` package, installed by ``scripts/bootstrap.sh`` next to
promtool) scrapes the gateways' metrics every second and evaluates the project's own rules
(compose/prometheus/alerts.yml, only their ``for:`` shortened in the test's copy). The test
blackholes the us-east → ap-south link with the WAN proxy, kills us-east's Redis (no
persistence: it comes back empty, a new epoch), and reads ``/api/v1/alerts`` until
``InvalgwLinkDown`` and ``InvalgwGapRecorded`` fire. The gap alert fires only because the gap
counter is exported at 0 from start-up: ``increase()`` needs a sample before the first gap.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from invalgw.config import Metrics, RegionConfig
from invalgw.dev.localredis import free_port
from invalgw.dev.wanproxy import send_command
from tests.conftest import REGIONS, make_configs
from tests.processes import Processes, die_with_parent, wait_for
from tests.servers import RedisServer

PROMETHEUS = shutil.which("prometheus")
RULES = Path(__file__).parent.parent / "compose" / "prometheus" / "alerts.yml"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="the prometheus server is not installed (Debian: apt-get install prometheus; "
        "scripts/bootstrap.sh ensure_tools promtool installs it)",
    ),
]


class Child:
    """A helper process (Prometheus, the WAN proxy) logging to a file, stopped at the end."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def fetch(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:  # noqa: S310 - loopback http
            return json.loads(reply.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def rules_with_short_for(workdir: Path) -> Path:
    """The shipped rules, unchanged but for ``for:`` (minutes in production, seconds here)."""
    text = re.sub(r"for: \d+m", "for: 3s", RULES.read_text())
    path = workdir / "alerts.yml"
    path.write_text(text)
    return path


def prometheus_config(workdir: Path, targets: list[str]) -> Path:
    rules = rules_with_short_for(workdir)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "invalgw", "static_configs": [{"targets": targets}]},
        ],
    }
    path = workdir / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


class Stack:
    def __init__(self, servers: list[RedisServer], namespace: str, workdir: Path) -> None:
        self.servers = dict(zip(REGIONS, servers, strict=True))
        self.children: list[Child] = []
        self.processes = Processes(workdir)
        self.control = ("127.0.0.1", free_port())
        proxy_port = free_port()
        target = f"127.0.0.1:{self.servers['ap-south'].port}"
        self.children.append(
            Child(
                [
                    sys.executable,
                    "-m",
                    "invalgw",
                    "wan-proxy",
                    "--listen",
                    f"127.0.0.1:{proxy_port}",
                    "--target",
                    target,
                    "--control",
                    f"{self.control[0]}:{self.control[1]}",
                ],
                workdir / "wanproxy.log",
            )
        )
        urls = {region: server.url for region, server in self.servers.items()}
        proxied = f"redis://127.0.0.1:{proxy_port}/0"
        configs = make_configs(urls, namespace, peer_urls={"us-east": {"ap-south": proxied}})
        self.metrics_ports = {region: free_port() for region in REGIONS}
        self.configs: dict[str, RegionConfig] = {
            region: msgspec.structs.replace(
                config, metrics=Metrics(port=self.metrics_ports[region])
            )
            for region, config in configs.items()
        }
        self.prometheus_port = free_port()
        config_path = prometheus_config(
            workdir, [f"127.0.0.1:{port}" for port in self.metrics_ports.values()]
        )
        assert PROMETHEUS is not None
        self.prometheus = Child(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
            ],
            workdir / "prometheus.log",
        )
        self.children.append(self.prometheus)

    def api(self, path: str) -> Any:
        return fetch(f"http://127.0.0.1:{self.prometheus_port}/api/v1/{path}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = self.api("query?query=" + urllib.parse.quote(expr))
        return [] if reply is None else list(reply["data"]["result"])

    def firing(self, name: str, **labels: str) -> bool:
        reply = self.api("alerts")
        if reply is None:
            return False
        return any(
            alert["labels"].get("alertname") == name
            and alert["state"] == "firing"
            and all(alert["labels"].get(k) == v for k, v in labels.items())
            for alert in reply["data"]["alerts"]
        )

    def close(self) -> None:
        self.processes.close()
        for child in self.children:
            child.stop()


@pytest.fixture
def stack(own_servers: list[RedisServer], namespace: str, tmp_path: Path) -> Iterator[Stack]:
    made = Stack(own_servers, namespace, tmp_path)
    try:
        yield made
    except BaseException:
        for child in made.children:
            sys.stderr.write(f"--- {child.log_path.name}\n{child.log()}\n")
        raise
    finally:
        made.close()


def test_link_down_and_gap_alerts_fire_on_a_real_prometheus(stack: Stack) -> None:
    stack.processes.start_all(stack.configs)
    wait_for(
        lambda: len(stack.query('up{job="invalgw"} == 1')) == 3,
        seconds=60,
        what="Prometheus to scrape the three gateways",
    )
    gap_series = 'invalgw_gaps_total{region="eu-west", origin="us-east"}'
    wait_for(lambda: bool(stack.query(gap_series)), seconds=30, what="the gap counter at 0")
    link = {"region": "us-east", "peer": "ap-south"}
    assert not stack.firing("InvalgwLinkDown", **link)

    assert send_command(stack.control, "blackhole").startswith("ok")
    stack.servers["us-east"].kill()
    stack.servers["us-east"].restart()

    wait_for(
        lambda: stack.firing("InvalgwLinkDown", **link),
        seconds=60,
        what="InvalgwLinkDown us-east → ap-south to fire",
    )
    wait_for(
        lambda: stack.firing("InvalgwGapRecorded", region="eu-west", origin="us-east"),
        seconds=60,
        what="InvalgwGapRecorded in eu-west for us-east to fire",
    )
    assert not stack.firing("InvalgwLinkDown", region="us-east", peer="eu-west")
    assert all(process.running for process in stack.processes.all)
