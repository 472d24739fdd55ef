"""What is unsafe is said, in one line: unverified TLS, refused credentials, duplicate fields,
floods of dead letters, and the alert counters that must exist before their first increment."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from invalgw import deadletter
from invalgw.cli import main
from invalgw.config import RegionConfig, parse_config
from invalgw.deadletter import REASONS, DeadLetter, DeadLetters
from invalgw.errors import ConfigError
from invalgw.metrics import Metrics
from invalgw.names import Names
from invalgw.poison import MAX_ATTEMPTS, PoisonGuard
from invalgw.read import Entry, GroupReader
from tests.conftest import clients, metric, running, stream_entries, wait_until, write_config
from tests.servers import RedisServer

WRONG = "redis://invalgw-us-east:not-the-password@"


@pytest.mark.parametrize("value", ["none", "CERT_NONE", "optional"])
def test_tls_without_certificate_checks_is_refused(value: str) -> None:
    raw = {"region": "us-east", "redis": {"url": f"rediss://h:6380/0?ssl_cert_reqs={value}"}}
    with pytest.raises(ConfigError) as refused:
        parse_config(raw)
    assert f"redis.url: ssl_cert_reqs={value} turns off the check" in str(refused.value)
    assert "ssl_ca_certs" in str(refused.value)


def test_tls_with_a_private_ca_is_accepted() -> None:
    url = "rediss://h:6380/0?ssl_ca_certs=/etc/ssl/ca.pem&ssl_cert_reqs=required"
    assert parse_config({"region": "us-east", "redis": {"url": url}}).redis.url == url


def wrong_password(config: RegionConfig, tmp_path: Path) -> Path:
    url = config.redis.url.replace("redis://", WRONG)
    path = write_config(tmp_path / "us-east.toml", config)
    path.write_text(path.read_text().replace(f'url = "{config.redis.url}"', f'url = "{url}"', 1))
    return path


def test_run_with_a_refused_password_exits_with_one_line(
    configs: dict[str, RegionConfig], tmp_path: Path
) -> None:
    path = wrong_password(configs["us-east"], tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "invalgw", "--log-level", "error", "run", "--config", str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "authentication failed" in err
    assert "Traceback" not in err
    assert "not-the-password" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_check_with_a_refused_password_says_so(
    configs: dict[str, RegionConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = wrong_password(configs["us-east"], tmp_path)
    assert main(["check", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "us-east (redis)" in line]
    assert line.startswith("FAIL")
    assert "authentication failed" in line


def test_lag_with_a_refused_password_says_so(
    configs: dict[str, RegionConfig], tmp_path: Path
) -> None:
    path = wrong_password(configs["us-east"], tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "invalgw", "lag", "--no-color", "--config", str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert "auth failed" in out
    assert "unreachable" not in out
    [line] = err.strip().splitlines()
    assert line.startswith("invalgw lag: us-east: ")
    assert "authentication failed" in line


@pytest.mark.anyio
async def test_an_entry_with_a_repeated_field_is_dead_lettered_whole(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    """``op purge op unlink``: not applied as whichever op came last; kept with both."""
    east = configs["us-east"]
    names = Names(east.streams.namespace, east.streams.local)
    key = f"{namespace}:twice"
    async with clients(configs) as redis_by_region, running(configs, "us-east") as gateways:
        client = redis_by_region["us-east"]
        await client.set(key, "cached")
        client.set_response_callback("XRANGE", _raw)  # type: ignore[arg-type]
        entry_id = await client.execute_command(  # type: ignore[no-untyped-call]
            "XADD", names.local_stream, "*", "op", "purge", "op", "unlink", "keys", key
        )

        async def dead_lettered() -> bool:
            return bool(await client.xlen(names.dead_letters))

        await wait_until(dead_lettered, what="the entry dead-lettered")
        raw: Any = await client.execute_command("XRANGE", names.dead_letters, "-", "+")  # type: ignore[no-untyped-call]
        [(_, fields)] = raw
        assert fields[:6] == [b"op", b"purge", b"op", b"unlink", b"keys", key.encode()]
        assert dict(zip(fields[::2], fields[1::2], strict=True))[b"dead.id"] == entry_id
        assert await client.exists(key) == 1
        reason = {"region": "us-east", "reason": "duplicate_field"}
        assert metric(gateways["us-east"], "invalgw_dead_letters_total", **reason) == 1


@pytest.mark.anyio
async def test_an_entry_with_a_repeated_field_is_not_sent_to_the_peers_either(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    """A sender that reads the stream itself (at start, or after it fell behind) refuses
    ``op purge op unlink`` too: the peers must not apply what the origin dead-lettered."""
    east = configs["us-east"]
    names = Names(east.streams.namespace, east.streams.local)
    twice, after = f"{namespace}:twice", f"{namespace}:after"
    async with clients(configs) as redis_by_region:
        west = redis_by_region["eu-west"]
        await west.mset({twice: "cached", after: "cached"})
        await redis_by_region["us-east"].execute_command(  # type: ignore[no-untyped-call]
            "XADD", names.local_stream, "*", "op", "purge", "op", "unlink", "keys", twice
        )  # before the gateway starts: its senders read it from the stream
        async with running(configs, "us-east", "eu-west"):
            await redis_by_region["us-east"].xadd(
                names.local_stream, {"op": "unlink", "keys": after}
            )

            async def later_entry_applied() -> bool:
                return int(await west.exists(after)) == 0

            await wait_until(later_entry_applied, what="the later entry applied in eu-west")
            assert await west.exists(twice) == 1


@pytest.mark.anyio
async def test_dead_letter_logs_are_rate_limited_with_counts(
    session_servers: list[RedisServer],
    namespace: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = parse_config({"region": "us-east", "redis": {"url": session_servers[0].url}})
    async with clients({"us-east": config}) as redis_by_region:
        letters = DeadLetters(
            redis_by_region["us-east"],
            f"{namespace}:dead",
            region="us-east",
            max_len=1000,
            metrics=Metrics("us-east"),
        )
        flood = [
            DeadLetter(f"1-{i}".encode(), {b"op": b"explode"}, "unknown op", "unknown_op")
            for i in range(50)
        ]
        with caplog.at_level(logging.WARNING, logger="invalgw.deadletter"):
            await letters.put("s", flood)
            assert len(caplog.records) == 1
            monkeypatch.setattr(deadletter, "LOG_INTERVAL_S", 0.0)
            await letters.put("s", [flood[0]])
        assert len(caplog.records) == 2
        assert "(and 49 more unknown_op since the last such line)" in caplog.records[1].message
        assert len(await stream_entries(redis_by_region["us-east"], f"{namespace}:dead")) == 51


@pytest.mark.anyio
async def test_alerting_counters_exist_at_zero_from_start_up(
    configs: dict[str, RegionConfig],
) -> None:
    async with running(configs, "eu-west") as gateways:
        registry = gateways["eu-west"].metrics.registry
        for origin in ("us-east", "eu-west", "ap-south"):
            labels = {"region": "eu-west", "origin": origin}
            assert registry.get_sample_value("invalgw_gaps_total", labels) == 0
        for reason in REASONS:
            labels = {"region": "eu-west", "reason": reason}
            assert registry.get_sample_value("invalgw_dead_letters_total", labels) == 0


def _raw(reply: Any, **_options: Any) -> Any:
    """A reply as Redis sent it: an entry's fields as a flat list, repeated names included."""
    return reply


@pytest.mark.anyio
async def test_an_entry_a_stage_keeps_failing_on_is_dead_lettered_and_the_rest_handled(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """A handler that raises on one entry (a bug met by odd data): that entry is dead-lettered
    after three tries and acknowledged; the others are handled; nothing is raised."""
    config = parse_config({"region": "us-east", "redis": {"url": session_servers[0].url}})
    async with clients({"us-east": config}) as redis_by_region:
        client = redis_by_region["us-east"]
        stream = f"{namespace}:stream"
        reader = GroupReader(client, stream, "g", "c", count=10, block_ms=10)
        await reader.ensure_group()
        for name in (b"a", b"poison", b"b"):
            await client.xadd(stream, {b"k": name})
        tries: Counter[bytes] = Counter()
        handled: list[bytes] = []

        async def handler(entries: Sequence[Entry]) -> None:
            for _, fields in entries:
                tries[fields[b"k"]] += 1
                if fields[b"k"] == b"poison":
                    raise KeyError("a bug met by this entry")
            for entry_id, _ in entries:
                handled.append(entry_id)
            await reader.ack([entry_id for entry_id, _ in entries])

        metrics = Metrics("us-east")
        letters = DeadLetters(
            client, f"{namespace}:dead", region="us-east", max_len=1000, metrics=metrics
        )
        guarded = PoisonGuard(handler, reader, letters, name="apply")
        assert await reader.read() == []  # this consumer's pending entries: none yet
        await guarded(await reader.read())
        assert tries[b"poison"] == 1 + MAX_ATTEMPTS
        assert len(handled) == 2
        [(_, letter)] = await stream_entries(client, f"{namespace}:dead")
        assert letter[b"k"] == b"poison"
        assert b"apply failed 3 times on this entry: KeyError" in letter[b"dead.reason"]
        pending: Any = await client.xpending(stream, "g")
        assert pending["pending"] == 0
        labels = {"region": "us-east", "reason": "handler_failed"}
        assert metrics.registry.get_sample_value("invalgw_dead_letters_total", labels) == 1
