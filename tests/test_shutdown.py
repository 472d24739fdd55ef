"""Graceful shutdown: the first SIGTERM/SIGINT finishes the batch in hand, acknowledges it, closes
its connections and exits 0; a second signal exits at once with 128 + the signal number."""

from __future__ import annotations

import signal
import time

import anyio
import pytest
import redis
import redis.asyncio

from invalgw.config import RegionConfig
from invalgw.connections import close
from invalgw.metrics import Metrics
from invalgw.proto import entry_fields
from invalgw.read import GroupReader
from invalgw.service import Gateway
from tests.conftest import REGIONS, make_configs, metric
from tests.processes import Processes, groups, sync_client, wait_for, write_burst
from tests.servers import RedisServer


def gateway_clients(client: redis.Redis, region: str) -> list[str]:
    """Names of the gateway's connections to ``client``'s Redis (CLIENT LIST)."""
    return [
        entry["name"]
        for entry in client.client_list()
        if entry["name"].startswith(f"invalgw:{region}:")
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_first_signal_drains_and_exits_0(
    session_servers: list[RedisServer], namespace: str, processes: Processes, signum: int
) -> None:
    urls = {region: server.url for region, server in zip(REGIONS, session_servers, strict=True)}
    configs = make_configs(urls, namespace, gateway={"batch_size": 50})
    config = configs["us-east"]
    local, peer = sync_client(config), sync_client(configs["eu-west"])
    stream = config.streams.local
    gateway = processes.add("us-east", config).start().wait_ready()
    total = write_burst(local, stream, [f"{namespace}:k{i}" for i in range(20_000)])

    def started_on_burst() -> bool:
        return int(groups(local, stream)["apply"]["entries-read"] or 0) >= 500

    wait_for(started_on_burst, what="the gateway to be busy with the burst")
    gateway.send(signum)

    assert gateway.wait() == 0
    infos = groups(local, stream)
    assert {name: info["pending"] for name, info in infos.items()} == dict.fromkeys(infos, 0)
    assert min(int(info["entries-read"]) for info in infos.values()) < total, "drained too late"
    assert "drained" in gateway.log()
    assert gateway_clients(local, "us-east") == []
    assert gateway_clients(peer, "us-east") == []


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_exits_at_once(
    own_servers: list[RedisServer], namespace: str, processes: Processes, signum: int
) -> None:
    urls = {region: server.url for region, server in zip(REGIONS, own_servers, strict=True)}
    configs = make_configs(urls, namespace, redis={"socket_timeout_ms": 10_000})
    gateway = processes.add("us-east", configs["us-east"]).start().wait_ready()
    own_servers[0].pause()  # the region's Redis hangs: the drain stalls
    try:
        gateway.send(signum)
        gateway.wait_for_log("draining")
        sent = time.monotonic()
        gateway.send(signum)
        assert gateway.wait(seconds=5) == 128 + signum
        assert time.monotonic() - sent < 3
    finally:
        own_servers[0].resume()
    assert "stopping now" in gateway.log()


@pytest.mark.e2e
def test_signal_during_start_up_exits_0(namespace: str, processes: Processes) -> None:
    """A gateway whose Redis cannot be reached yet still stops cleanly when asked to."""
    from invalgw.dev.localredis import free_port

    urls = {region: f"redis://127.0.0.1:{free_port()}/0" for region in REGIONS}
    gateway = processes.add("us-east", make_configs(urls, namespace)["us-east"]).start()
    gateway.wait_for_log("retrying")
    gateway.send(signal.SIGTERM)
    assert gateway.wait(seconds=5) == 0


@pytest.mark.anyio
async def test_drain_during_start_up_returns_cleanly(namespace: str) -> None:
    """``Gateway.run`` started in a task group and drained before it could connect."""
    from invalgw.dev.localredis import free_port

    urls = {region: f"redis://127.0.0.1:{free_port()}/0" for region in REGIONS}
    gateway = Gateway(make_configs(urls, namespace)["us-east"], metrics=Metrics("us-east"))

    async def drain_after_first_failure() -> None:
        labels = {"region": "us-east", "target": "us-east"}
        while not metric(gateway, "invalgw_redis_errors_total", **labels):  # noqa: ASYNC110
            await anyio.sleep(0.01)
        gateway.request_drain()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain_after_first_failure)
            await tg.start(gateway.run)


@pytest.mark.anyio
async def test_cancelled_blocking_read_leaves_client_usable(
    configs: dict[str, RegionConfig],
) -> None:
    """Cancelling XREADGROUP … BLOCK mid-flight must not leave the connection out of step."""
    config = configs["us-east"]
    client = redis.asyncio.Redis.from_url(
        config.redis.url,
        socket_timeout=5,
        socket_connect_timeout=2,
        retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0),
        single_connection_client=True,
    )
    stream = config.streams.local
    reader = GroupReader(client, stream, "apply", "t", count=10, block_ms=3000)
    try:
        await reader.ensure_group()
        assert await reader.read() == []  # pending list empty: the next read blocks
        for _ in range(3):
            with anyio.move_on_after(0.05):
                await reader.read()
            assert await client.ping()
        entry_id = await client.xadd(stream, entry_fields(["k"]))  # type: ignore[arg-type]
        assert await client.get("missing-key") is None
        entries = await reader.read()
        assert [found for found, _ in entries] == [entry_id]
        assert entries[0][1][b"keys"] == b"k"
    finally:
        await close(client)


@pytest.mark.e2e
def test_drain_while_the_region_redis_is_down_exits_0(
    own_servers: list[RedisServer], namespace: str, processes: Processes
) -> None:
    """Nothing is in hand when the region's Redis is gone: the drain still ends cleanly."""
    urls = {region: server.url for region, server in zip(REGIONS, own_servers, strict=True)}
    gateway = processes.add("us-east", make_configs(urls, namespace)["us-east"])
    gateway.start().wait_ready()
    own_servers[0].kill()
    gateway.wait_for_log("retrying")
    gateway.send(signal.SIGTERM)
    assert gateway.wait(seconds=8) == 0
    assert "Traceback" not in gateway.log()
