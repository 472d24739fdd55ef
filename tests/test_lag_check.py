"""invalgw lag --check / --fail-on: an exit status a cron job or a deploy gate can act on."""

from __future__ import annotations

import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest

from invalgw.ops.lagcheck import parse_conditions, problems
from invalgw.ops.lagtable import LinkRow, Snapshot
from tests.conftest import running, wait_until, write_config
from tests.servers import RedisServer
from tests.test_partitions import ap_south_behind_proxies

pytestmark = pytest.mark.anyio


async def lag_check(paths: list[Path], *options: str) -> tuple[int, str]:
    argv = [sys.executable, "-m", "invalgw", "lag", *(options or ("--check",))]
    for path in paths:
        argv += ["--config", str(path)]
    result = await anyio.run_process(argv, check=False)
    assert result.returncode in (0, 1), result.stderr.decode()
    return result.returncode, result.stdout.decode()


async def test_lag_check_fails_while_a_link_is_blackholed_and_passes_after_the_heal(
    session_servers: list[RedisServer], namespace: str, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        configs, link = await stack.enter_async_context(
            ap_south_behind_proxies(session_servers, namespace)
        )
        paths = [write_config(tmp_path / f"{name}.toml", c) for name, c in configs.items()]
        await stack.enter_async_context(running(configs))
        seen: list[tuple[int, str]] = []

        async def check_is(code: int) -> bool:
            seen.append(await lag_check(paths))
            return seen[-1][0] == code

        await wait_until(lambda: check_is(0), seconds=20, interval=0.3, what="every pair healthy")
        assert seen[-1][1] == ""

        link.blackhole()
        silent = {"us-east → ap-south: silent", "eu-west → ap-south: silent"}

        async def both_silent() -> bool:  # each link's last heartbeat ages on its own clock
            return await check_is(1) and silent <= set(seen[-1][1].splitlines())

        await wait_until(both_silent, seconds=20, interval=0.3, what="lag --check to fail")
        lines = seen[-1][1].splitlines()
        assert all("→ ap-south" in line for line in lines), lines

        code, output = await lag_check(paths, "--fail-on", "silent,heartbeat>2", "--json")
        report = json.loads(output)
        assert (code, report["ok"]) == (1, False)
        assert report["fail_on"] == ["silent", "heartbeat>2"]
        assert {(p["origin"], p["region"]) for p in report["unhealthy"]} == {
            ("us-east", "ap-south"),
            ("eu-west", "ap-south"),
        }

        link.heal()
        await wait_until(lambda: check_is(0), seconds=20, interval=0.3, what="lag --check to pass")


def row(**fields: object) -> LinkRow:
    values: dict[str, object] = {"origin": "a", "region": "b", "state": "ok", **fields}
    return LinkRow(**values)  # type: ignore[arg-type]


def test_fail_on_bounds_name_the_pair_and_the_reason() -> None:
    snapshot = Snapshot(
        taken_at=0.0,
        links=[
            row(backlog=20_000, mirror_backlog=3),
            row(origin="c", lag_p99_ms=7500.0),
            row(origin="d", state="stale"),
            row(origin="e", heartbeat_age_ms=100.0, backlog=0),
        ],
        regions=[],
    )
    found = problems(snapshot, parse_conditions("stale, backlog>10000,lag>5"))
    assert [problem.line() for problem in found] == [
        "a → b: backlog 20000 > 10000",
        "c → b: lag 7.5 s > 5 s",
        "d → b: stale",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sleepy", "unknown state 'sleepy'"),
        ("latency>5", "unknown measure 'latency'"),
        ("lag>soon", "'soon' is not a number"),
        (",", "no condition given"),
    ],
)
def test_bad_conditions_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_conditions(text)


async def test_a_bad_fail_on_is_a_usage_error(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "invalgw", "lag", "--fail-on", "lag>x", "--regions", "."]
    result = await anyio.run_process(argv, check=False)
    assert result.returncode == 2
    assert "'x' is not a number" in result.stderr.decode()
