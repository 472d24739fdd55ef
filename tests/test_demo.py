"""``invalgw demo``: runs every region on this machine and leaves nothing running behind."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from invalgw.cli import main
from invalgw.config import load_config
from invalgw.dev.demo import regions_dir
from invalgw.dev.localmesh import load_mesh

REPO = Path(__file__).resolve().parent.parent
REGIONS = ("us-east", "eu-west", "ap-south")
PAIRS = [(origin, region) for origin in REGIONS for region in REGIONS]


def free_block(size: int) -> int:
    """The first of ``size`` consecutive ports nothing listens on (the demo binds them itself)."""
    for _ in range(100):
        base = random.randrange(20_000, 60_000)
        if all(_bindable(port) for port in range(base, base + size)):
            return base
    raise RuntimeError("no block of free ports found")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def processes_mentioning(text: str) -> dict[int, str]:
    """Running processes whose command line contains ``text``: pid → command line."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it exited while we looked
        if text in line and int(cmdline.parent.name) != os.getpid():
            found[int(cmdline.parent.name)] = line
    return found


def demo_command(workdir: Path, *args: str) -> list[str]:
    base = free_block(2 * len(REGIONS))
    return [
        sys.executable,
        "-m",
        "gateway",
        "demo",
        "--port-base",
        str(base),
        "--workdir",
        str(workdir),
        "--rate",
        "200",
        *args,
    ]


def wait_for(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.05)


def table_rows(output: str) -> dict[tuple[str, str], str]:
    """The last line printed for each origin → region pair."""
    rows = {}
    for line in output.splitlines():
        match = re.match(r"([a-z0-9][a-z0-9._-]*) → ([a-z0-9][a-z0-9._-]*)\s", line)
        if match:
            rows[(match[1], match[2])] = line
    return rows


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    workdir = tmp_path / "demo"
    yield workdir
    leftovers = processes_mentioning(str(workdir))
    for pid in leftovers:  # never leave them running, even when the test failed
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left running: {leftovers}"


@pytest.mark.e2e
def test_demo_runs_every_region_for_its_duration_then_stops_everything(
    workdir: Path, tmp_path: Path
) -> None:
    last = tmp_path / "last.json"
    command = demo_command(workdir, "--duration", "4", "--json", str(last))
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr + done.stdout
    rows = table_rows(done.stdout)
    assert sorted(rows) == sorted(PAIRS), done.stdout
    assert "Stopped." in done.stdout
    snapshot = json.loads(last.read_text())
    assert {(link["origin"], link["region"]) for link in snapshot["links"]} == set(PAIRS)
    for link in snapshot["links"]:  # traffic arrived everywhere, from everywhere
        assert link["applied"] > 0, link
        assert link["state"] in ("ok", "catch-up"), link
    for region in snapshot["regions"]:
        assert (region["dead_letters"], region["gaps"]) == (0, 0), region
    assert processes_mentioning(str(workdir)) == {}
    logs = sorted(path.name for path in (workdir / "logs").iterdir())
    assert logs == sorted(f"{region}.log" for region in REGIONS)


@pytest.mark.e2e
def test_ctrl_c_stops_the_demo_and_everything_it_started(workdir: Path, tmp_path: Path) -> None:
    output = tmp_path / "stdout.txt"
    with output.open("w") as stdout:
        demo = subprocess.Popen(demo_command(workdir), cwd=REPO, stdout=stdout, stderr=stdout)
    try:
        try:
            wait_for(lambda: len(table_rows(output.read_text())) == 9, 30, "the first table")
        except BaseException:
            print(output.read_text())  # shown by pytest with the failure
            raise
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 0, output.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
    assert "Stopping 3 gateways" in output.read_text()
    assert processes_mentioning(str(workdir)) == {}


def test_a_port_in_use_is_named_with_its_region_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = free_block(6)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        regions = str(REPO / "regions")
        workdir = str(tmp_path / "demo")
        code = main(["demo", "--regions", regions, "--port-base", str(base), "--workdir", workdir])
    assert code == 1
    error = capsys.readouterr().err
    assert f"regions/eu-west.toml: port {base + 1}" in error
    assert "already in use" in error


def test_without_redis_the_demo_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("INVALGW_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    code = main(["demo", "--regions", str(REPO / "regions"), "--workdir", str(tmp_path / "d")])
    assert code == 1
    assert "apt-get install redis-server" in capsys.readouterr().err


def test_a_peer_at_the_wrong_port_is_named_with_its_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    regions = tmp_path / "regions"
    regions.mkdir()
    for region in REGIONS:
        text = (REPO / "regions" / f"{region}.toml").read_text()
        if region == "ap-south":
            text = text.replace("127.0.0.1:6392", "127.0.0.1:6399")
        (regions / f"{region}.toml").write_text(text)

    code = main(["demo", "--regions", str(regions), "--workdir", str(tmp_path / "demo")])

    assert code == 2
    error = capsys.readouterr().err
    assert "ap-south.toml: peers[1].url: eu-west's Redis is on port 6392" in error


def test_port_base_moves_every_port_and_the_moved_files_load_back(tmp_path: Path) -> None:
    mesh = load_mesh(REPO / "regions", port_base=31000, workdir=tmp_path)

    assert [region.name for region in mesh] == list(REGIONS)  # in port order
    assert [region.port for region in mesh] == [31000, 31001, 31002]
    for region in mesh:
        moved = load_config(region.config_path)
        assert moved == region.config
        assert moved.metrics.port == 31003 + REGIONS.index(region.name)
        original = load_config(region.source)
        peers = {peer.name: peer.url for peer in moved.peers}
        assert peers == {
            other.name: f"redis://127.0.0.1:{other.port}/0" for other in mesh if other != region
        }
        assert moved.streams == original.streams
        assert moved.gateway == original.gateway


def test_without_a_regions_folder_the_demo_runs_the_sample_regions_it_ships(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    samples = regions_dir(None)
    assert sorted(path.name for path in samples.glob("*.toml")) == [
        "ap-south.toml",
        "eu-west.toml",
        "us-east.toml",
    ]
    mesh = load_mesh(samples, port_base=None, workdir=tmp_path)
    assert [region.name for region in mesh] == ["us-east", "eu-west", "ap-south"]
    (tmp_path / "regions").mkdir()
    assert regions_dir(None) == Path("regions")  # a regions/ of one's own comes first
