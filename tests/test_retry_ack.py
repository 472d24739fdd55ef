"""A held entry is acknowledged even when Redis refuses the acknowledgement once."""

from __future__ import annotations

import anyio
import pytest

from invalgw.apply import ack_when_done
from invalgw.cache import Cache
from invalgw.connections import close
from invalgw.effects import Plan
from invalgw.read import GroupReader
from invalgw.retries import CacheRetries, RetryJob
from invalgw.stages import Drain
from tests.conftest import wait_until
from tests.servers import RedisServer, async_client

pytestmark = pytest.mark.anyio


async def test_a_cache_retry_whose_acknowledgement_failed_acknowledges_later(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """The node came back and the keys went, but the XACK failed (a Redis blip): the entry
    must still be acknowledged once Redis answers, not stay pending (and block trimming) for
    the gateway's lifetime."""
    url = session_servers[0].url
    admin = async_client(url)
    user, password = f"{namespace}-reader", "pw"
    await admin.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    stream = f"{namespace}:stream"
    reads = async_client(url, username=user, password=password)
    drain = Drain()
    try:
        entry_id: bytes = await admin.xadd(stream, {"keys": "k"})  # type: ignore[assignment]
        reader = GroupReader(reads, stream, "apply", "c1", count=10, block_ms=10)
        await reader.ensure_group()
        assert await reader.read() == []  # this consumer's pending entries: none
        assert [e[0] for e in await reader.read()] == [entry_id]
        done = ack_when_done(reader, entry_id, 1)
        retries = CacheRetries(Cache(admin), drain=drain)
        await admin.acl_setuser(user, enabled=True, commands=["-xack"])  # the ack fails
        await admin.acl_log_reset()
        async with anyio.create_task_group() as tg:
            await tg.start(retries.run)
            retries.submit(RetryJob(Plan(), [done]))

            async def refused() -> bool:
                return any(b"xack" in repr(item).encode() for item in await admin.acl_log())

            await wait_until(refused, what="the acknowledgement to be refused")
            await admin.acl_setuser(user, enabled=True, commands=["+xack"])

            async def acknowledged() -> bool:
                return int((await admin.xpending(stream, "apply"))["pending"]) == 0

            await wait_until(acknowledged, what="the entry to be acknowledged")
            drain.request()
    finally:
        await admin.acl_deluser(user)
        await admin.delete(stream)
        await close(reads)
        await close(admin)
