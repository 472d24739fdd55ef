"""The command line as an operator meets it: publish speaks the contract, every option says
what it does, check speaks JSON, and commands receive typed options, never argparse's."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from invalgw import cli
from invalgw.config import RegionConfig
from invalgw.proto import Limits, parse_entry
from tests.conftest import write_config

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def last_entry(client: redis.Redis, stream: str) -> tuple[str, dict[bytes, bytes]]:
    entries: Any = client.xrevrange(stream, count=1)
    assert entries, f"nothing in {stream}"
    entry_id, fields = entries[0]
    return entry_id.decode(), dict(fields)


def test_publish_writes_what_the_readmes_redis_cli_line_writes(
    configs: dict[str, RegionConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = configs["us-east"]
    path = write_config(tmp_path / "us-east.toml", config)
    stream = config.streams.local
    client = redis.Redis.from_url(config.redis.url, socket_timeout=5)
    try:
        # redis-cli XADD invalidations '*' op expire pattern "{user:1001}:*"
        client.execute_command(  # type: ignore[no-untyped-call]
            "XADD", stream, "*", "op", "expire", "pattern", "{user:1001}:*"
        )
        by_cli_id, by_cli = last_entry(client, stream)
        argv = ["publish", "--config", str(path), "--op", "expire", "--pattern", "{user:1001}:*"]
        assert cli.main(argv) == 0
        by_us_id, by_us = last_entry(client, stream)
        assert capsys.readouterr().out.strip() == by_us_id

        limits = Limits()
        ours, theirs = parse_entry(by_us_id, by_us, limits), parse_entry(by_cli_id, by_cli, limits)
        assert msgspec.structs.replace(ours, id="") == msgspec.structs.replace(theirs, id="")
        assert (ours.op, ours.pattern, ours.keys) == ("expire", "{user:1001}:*", [])

        argv = ["publish", "--config", str(path), "--version", "1042", "--source", "orders"]
        argv += ["--traceparent", TRACEPARENT, "--op", "hybrid", "user:1001:profile", "a b"]
        assert cli.main(argv) == 0
        entry_id, fields = last_entry(client, stream)
        event = parse_entry(entry_id, fields, limits)
        assert (event.op, event.keys, event.version) == (
            "hybrid",
            ["user:1001:profile", "a b"],
            "1042",
        )
        assert (event.source, event.traceparent) == ("orders", TRACEPARENT)
    finally:
        client.close()


def test_publish_needs_keys_or_a_pattern(
    configs: dict[str, RegionConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(write_config(tmp_path / "us-east.toml", configs["us-east"]))
    assert cli.main(["publish", "--config", path]) == 2
    assert cli.main(["publish", "--config", path, "--pattern", "a:*", "a:1"]) == 2
    assert "give the KEYs to invalidate, or --pattern (not both)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before anything is written, not dead-lettered
        cli.main(["publish", "--config", path, "--version", "-3", "a:1"])
    assert "'-3' is not a non-negative integer" in capsys.readouterr().err


def every_parser(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from every_parser(sub)


def test_every_option_of_every_command_has_help_text() -> None:
    missing = [
        f"{prog} {'/'.join(action.option_strings) or action.dest}"
        for prog, parser in every_parser(cli._parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()
    ]
    assert missing == []


def test_bench_help_is_plain_words(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    shown = capsys.readouterr().out
    assert "``" not in shown
    assert "latency" in shown
    assert "throughput" in shown


def test_commands_receive_typed_options_not_a_namespace() -> None:
    for _prog, parser in every_parser(cli._parser()):
        options = parser.get_default("_options")
        if options is None:
            continue
        assert isinstance(options, type), options
        assert dataclasses.is_dataclass(options), options
        assert getattr(options, "__dataclass_params__").frozen, options  # noqa: B009


def test_check_speaks_json(
    configs: dict[str, RegionConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(write_config(tmp_path / "eu-west.toml", configs["eu-west"]))
    assert cli.main(["check", "--json", "--config", path]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["region"], report["ok"]) == ("eu-west", True)
    targets = {target["target"]: target for target in report["targets"]}
    assert set(targets) == {"eu-west (redis)", "peer us-east", "peer ap-south"}
    assert all(target["ok"] and target["redis_version"] for target in targets.values())
