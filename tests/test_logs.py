"""--log-format json / INVALGW_LOG_FORMAT: one JSON object per line, with structured fields."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from invalgw import logs
from invalgw.config import parse_config
from tests.conftest import write_config


def test_json_lines_carry_time_level_logger_message_and_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("invalgw.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    token = logs.bind(region="us-east")
    try:
        logger.warning(
            "%s: batch of %d sent",
            "eu-west",
            3,
            extra={"peer": "eu-west", "stream": "invalidations", "ids": ["1-0", "2-0"], "n": 3},
        )
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("key %r failed", b"\xff", extra={"key": b"\xffbad"})
    finally:
        logger.removeHandler(handler)
        logs.unbind(token)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["time"].endswith("Z")
    assert first["level"] == "warning"
    assert first["logger"] == "invalgw.test_logs"
    assert first["message"] == "eu-west: batch of 3 sent"
    assert first["region"] == "us-east"
    assert (first["peer"], first["stream"], first["ids"], first["n"]) == (
        "eu-west",
        "invalidations",
        ["1-0", "2-0"],
        3,
    )
    assert second["level"] == "error"
    assert second["key"] == "\\xffbad"  # keys are bytes: shown, never crash the log line
    assert "RuntimeError: boom" in second["exception"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.anyio
async def test_the_environment_turns_a_gateways_log_into_json(tmp_path: Path) -> None:
    """A gateway whose Redis does not answer says so, in JSON, naming its region."""
    dead = f"redis://127.0.0.1:{free_port()}"
    config = parse_config(
        {
            "region": "us-east",
            "redis": {"url": dead, "connect_timeout_ms": 100},
            "peers": [{"name": "eu-west", "url": dead}],
        },
        "<test>",
    )
    path = write_config(tmp_path / "us-east.toml", config)
    env = {**os.environ, "INVALGW_LOG_FORMAT": "json"}
    command = [sys.executable, "-m", "invalgw", "run", "--config", str(path)]
    with subprocess.Popen(  # noqa: ASYNC220 - read line by line below, in a thread
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True
    ) as process:
        try:
            record = await first_warning(process)
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert record["region"] == "us-east"
    assert record["logger"].startswith("invalgw.")
    assert "retrying" in record["message"]


async def first_warning(process: subprocess.Popen[str]) -> dict[str, str]:
    """The first warning the process logs on stderr; every line before it must be JSON too."""
    assert process.stderr is not None
    with anyio.fail_after(20):
        while True:
            line = await anyio.to_thread.run_sync(process.stderr.readline)
            assert line, "the gateway exited without saying why"
            record: dict[str, str] = json.loads(line)
            if record["level"] == "warning":
                return record


def test_log_format_defaults_to_text_and_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(logs.ENV_FORMAT, raising=False)
    assert logs.default_format() == "text"
    monkeypatch.setenv(logs.ENV_FORMAT, "JSON")
    assert logs.default_format() == "json"
    monkeypatch.setenv(logs.ENV_FORMAT, "yaml")
    assert logs.default_format() == "text"
