"""A pattern walk that keeps failing is dead-lettered, even if Redis refuses it for a while."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from invalgw.cache import Cache
from invalgw.connections import close
from invalgw.deadletter import DeadLetters
from invalgw.metrics import Metrics
from invalgw.policy import Policy, Resolver
from invalgw.proto import Invalidation
from invalgw.scanner import ScanJob, Scanner
from invalgw.stages import Drain
from tests.conftest import wait_until
from tests.servers import RedisServer, async_client

pytestmark = pytest.mark.anyio


class BrokenCache(Cache):
    """A cache whose walks meet a bug (not a Redis error) every time."""

    async def scan(self, pattern: str, *, count: int = 1000) -> AsyncIterator[list[bytes]]:
        raise RuntimeError("a bug met by this pattern")
        yield []  # pragma: no cover - makes this an async generator


async def test_a_walk_given_up_while_redis_refuses_the_dead_letter_stops_nothing(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """The walk failed three times; writing its dead letter fails on Redis (here: refused).
    The scanner must retry that like any Redis error, not die (and take the gateway with it);
    once Redis answers, the letter is written and the entry acknowledged."""
    url = session_servers[0].url
    admin = async_client(url)
    user, password = f"{namespace}-scanner", "pw"
    await admin.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-xadd"],
    )
    await admin.acl_log_reset()
    letters_stream = f"{namespace}:dead"
    writer = async_client(url, username=user, password=password)
    drain = Drain()
    metrics = Metrics("r", CollectorRegistry())
    letters = DeadLetters(writer, letters_stream, region="r", max_len=100, metrics=metrics)
    scanner = Scanner(
        BrokenCache(admin),
        Resolver(Policy(), "r", ["r"]),
        region="r",
        metrics=metrics,
        drain=drain,
        dead_letters=letters,
    )
    acknowledged = anyio.Event()

    async def done() -> None:
        acknowledged.set()

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(scanner.run)
            event = Invalidation("1-1", "unlink", [], pattern=f"{namespace}:*")
            scanner.submit(ScanJob(event, "r", done))

            async def refused() -> bool:
                return any(b"xadd" in repr(item).encode() for item in await admin.acl_log())

            await wait_until(refused, what="the dead letter to be refused")
            await admin.acl_setuser(user, enabled=True, commands=["+xadd"])
            with anyio.fail_after(10):
                await acknowledged.wait()
            assert await admin.xlen(letters_stream) == 1
            drain.request()
    finally:
        await admin.acl_deluser(user)
        await admin.delete(letters_stream)
        await close(writer)
        await close(admin)


async def test_each_entry_waiting_for_a_walk_is_told_once_even_if_one_fails(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """Two entries wait for the same walk; acknowledging the second fails once (Redis went
    away). Then the second is told again, and the first not: one part of an entry with several
    walks told twice would acknowledge it before its other walks ended."""
    client = async_client(session_servers[0].url)
    drain = Drain()
    scanner = Scanner(
        Cache(client),
        Resolver(Policy(), "r", ["r"]),
        region="r",
        metrics=Metrics("r", CollectorRegistry()),
        drain=drain,
    )
    calls = {"first": 0, "second": 0}
    second_acknowledged = anyio.Event()

    async def first() -> None:
        calls["first"] += 1

    async def second() -> None:
        calls["second"] += 1
        if calls["second"] == 1:
            raise redis.ConnectionError("Redis went away while acknowledging")
        second_acknowledged.set()

    event = Invalidation("1-1", "unlink", [], pattern=f"{namespace}:*")
    try:
        await client.set(f"{namespace}:k", "1")
        async with anyio.create_task_group() as tg:
            scanner.submit(ScanJob(event, "r", first))
            scanner.submit(ScanJob(event, "r", second))  # joins the walk queued
            await tg.start(scanner.run)
            with anyio.fail_after(10):
                await second_acknowledged.wait()
            drain.request()
        assert calls == {"first": 1, "second": 2}
    finally:
        await close(client)
