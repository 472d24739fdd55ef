"""Fixtures: real Redis servers (one per region), region configs, gateways in-process."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
import redis.asyncio
from opentelemetry.sdk.trace import TracerProvider

from invalgw.config import RegionConfig, parse_config, to_toml
from invalgw.connections import close
from invalgw.dev.wanproxy import WanProxy
from invalgw.metrics import Metrics
from invalgw.service import Gateway
from tests.processes import Processes
from tests.servers import RedisServer, no_retry, redis_servers

REGIONS = ("us-east", "eu-west", "ap-south")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


PROCESSES = pytest.StashKey[Processes]()


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Processes]:
    """Gateways run as child processes; all stopped at the end, their logs shown on failure."""
    made = Processes(tmp_path)
    request.node.stash[PROCESSES] = made
    try:
        yield made
    finally:
        made.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the logs of a failed test's gateway processes to its report."""
    report = yield
    if report.failed and PROCESSES in item.stash:
        for name, log in item.stash[PROCESSES].logs():
            report.sections.append((f"gateway {name} log ({report.when})", log))
    return report


@pytest.fixture(scope="session")
def session_servers() -> Iterator[list[RedisServer]]:
    """Three servers shared by tests that do not stop or restart them (keys are unique per test)."""
    with redis_servers(len(REGIONS)) as servers:
        yield servers


@pytest.fixture
def own_servers() -> Iterator[list[RedisServer]]:
    """Three servers of this test's own, for tests that kill or restart a region's Redis."""
    with redis_servers(len(REGIONS)) as servers:
        yield servers


@pytest.fixture
def namespace() -> str:
    """A namespace unique to the test, so tests sharing servers never see each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}"


def make_configs(
    urls: dict[str, str], namespace: str, **overrides: dict[str, Any]
) -> dict[str, RegionConfig]:
    """Configs for a full mesh of regions; ``overrides`` are merged per section, e.g.
    ``gateway={"batch_size": 50}`` or ``peer_urls={"eu-west": {"us-east": "redis://…"}}``."""
    peer_urls: dict[str, dict[str, str]] = overrides.pop("peer_urls", {})
    configs = {}
    for region, url in urls.items():
        raw: dict[str, Any] = {
            "region": region,
            "redis": {"url": url, "socket_timeout_ms": 2000, "connect_timeout_ms": 500},
            "peers": [
                {
                    "name": peer,
                    "url": peer_urls.get(region, {}).get(peer, peer_url),
                    "socket_timeout_ms": 1000,
                    "connect_timeout_ms": 300,
                    "retries": 0,
                }
                for peer, peer_url in urls.items()
                if peer != region
            ],
            # the gateway's own keys (refused as targets) apart from the test's cache keys
            "streams": {"namespace": f"{namespace}-gw", "local": f"{namespace}-gw:inval"},
            "gateway": {
                "consumer": "test",
                "block_ms": 200,
                "heartbeat_interval_ms": 200,
                "retry_backoff_cap_ms": 200,
                "drain_timeout_ms": 5000,
                "lease_ms": 1000,
            },
        }
        for section, values in overrides.items():
            raw[section] = {**raw.get(section, {}), **values}
        configs[region] = parse_config(raw, f"<{region}>")
    return configs


@pytest.fixture
def configs(session_servers: list[RedisServer], namespace: str) -> dict[str, RegionConfig]:
    return make_configs(
        {region: server.url for region, server in zip(REGIONS, session_servers, strict=True)},
        namespace,
    )


@asynccontextmanager
async def running(
    configs: dict[str, RegionConfig], *only: str, tracer_provider: TracerProvider | None = None
) -> AsyncIterator[dict[str, Gateway]]:
    """Run the regions' gateways in this process until the block ends (then drain them)."""
    gateways = {
        name: Gateway(config, metrics=Metrics(name), tracer_provider=tracer_provider)
        for name, config in configs.items()
        if not only or name in only
    }
    async with anyio.create_task_group() as tg:
        for gateway in gateways.values():
            await tg.start(gateway.run)
        try:
            yield gateways
        finally:
            for gateway in gateways.values():
                gateway.request_drain()


@asynccontextmanager
async def proxied(url: str, **options: Any) -> AsyncIterator[WanProxy]:
    """A :class:`WanProxy` in front of the Redis at ``url``, serving until the block ends;
    reach it with :func:`via`."""
    target = urlsplit(url)
    assert target.hostname is not None
    assert target.port is not None
    proxy = WanProxy(target.hostname, target.port, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()


def via(proxy: WanProxy, url: str) -> str:
    """``url`` (a Redis URL) pointing at ``proxy`` instead."""
    return urlsplit(url)._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()


@asynccontextmanager
async def clients(
    configs: dict[str, RegionConfig],
) -> AsyncIterator[dict[str, redis.asyncio.Redis]]:
    """Plain test clients, one per region's Redis."""
    made = {
        name: redis.asyncio.Redis.from_url(
            config.redis.url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
        )
        for name, config in configs.items()
    }
    try:
        yield made
    finally:
        for client in made.values():
            await close(client)


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    *,
    seconds: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``seconds``."""
    try:
        with anyio.fail_after(seconds):
            while not await condition():  # noqa: ASYNC110 - polling Redis, there is no event
                await anyio.sleep(interval)
    except TimeoutError:
        pytest.fail(f"timed out after {seconds}s waiting for {what}")


def write_config(path: Path, config: RegionConfig) -> Path:
    """Write ``config`` as a TOML region file (for tests that run the gateway as a process)."""
    path.write_text(to_toml(config))
    return path


async def wait_gone(
    client: redis.asyncio.Redis, keys: list[str], *, region: str, seconds: float = 10.0
) -> None:
    """Wait until none of ``keys`` exists in ``client``'s Redis."""

    async def gone() -> bool:
        return int(await client.exists(*keys)) == 0

    await wait_until(gone, seconds=seconds, what=f"{len(keys)} keys to be gone in {region}")


async def stream_entries(
    client: redis.asyncio.Redis, stream: str
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of ``stream`` (XRANGE - +), typed for the tests."""
    entries: Any = await client.xrange(stream)
    return [(entry_id, dict(fields)) for entry_id, fields in entries]


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    """The exported value of ``name`` (as Prometheus scrapes it) for ``labels``; 0 if unset."""
    value = gateway.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
