"""/healthz and /readyz on the metrics port: ready is the lease holder that reaches its Redis."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

import anyio
import msgspec
import pytest

from invalgw.config import RegionConfig
from invalgw.metrics import Metrics
from invalgw.service import Gateway
from tests.conftest import wait_until

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def status(port: int, path: str) -> tuple[int, dict[str, Any]]:
    return await anyio.to_thread.run_sync(get, port, path)


def gateway(config: RegionConfig, consumer: str, port: int) -> Gateway:
    config = msgspec.structs.replace(
        config,
        gateway=msgspec.structs.replace(config.gateway, consumer=consumer),
        metrics=msgspec.structs.replace(config.metrics, port=port, host="127.0.0.1"),
    )
    return Gateway(config, metrics=Metrics(config.region))


async def test_readyz_fails_for_a_standby_and_passes_for_the_lease_holder(
    configs: dict[str, RegionConfig],
) -> None:
    config = configs["us-east"]
    active_port, standby_port = free_port(), free_port()
    active = gateway(config, "slot-a", active_port)
    standby = gateway(config, "slot-b", standby_port)
    async with anyio.create_task_group() as tg:
        await tg.start(active.run)
        tg.start_soon(standby.run)

        async def answers(port: int, path: str, code: int) -> bool:
            try:
                return (await status(port, path))[0] == code
            except OSError:  # not listening yet
                return False

        await wait_until(lambda: answers(standby_port, "/readyz", 503), what="standby's /readyz")
        code, body = await status(active_port, "/readyz")
        assert (code, body["ok"], body["lease_held"]) == (200, True, True)
        code, body = await status(standby_port, "/readyz")
        assert (code, body["lease_held"]) == (503, False)
        for port in (active_port, standby_port):
            assert (await status(port, "/healthz"))[0] == 200

        active.request_drain()  # hands the lease over at once
        await wait_until(lambda: answers(standby_port, "/readyz", 200), what="the takeover")
        standby.request_drain()


async def test_metrics_stay_on_the_same_port(configs: dict[str, RegionConfig]) -> None:
    port = free_port()
    running = gateway(configs["eu-west"], "slot-a", port)
    async with anyio.create_task_group() as tg:
        await tg.start(running.run)

        def scrape() -> str:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                return str(reply.read().decode())

        text = await anyio.to_thread.run_sync(scrape)
        running.request_drain()
    assert 'invalgw_lease_held{region="eu-west"} 1.0' in text
    assert "process_resident_memory_bytes" in text
