"""The local stream's reader lingers after a small batch, so that at low rates one read carries
several entries (every batch costs a read, an acknowledgement and one append per peer)."""

from __future__ import annotations

import time

import anyio
import pytest

from invalgw.config import parse_config
from invalgw.read import Entry, GroupReader
from tests.conftest import clients
from tests.servers import RedisServer

LINGER_MS = 1000
"""Long, so that a read that does not linger is told apart even on a busy machine."""


@pytest.mark.anyio
async def test_a_read_after_a_small_batch_waits_and_gathers_what_arrives_meanwhile(
    session_servers: list[RedisServer], namespace: str
) -> None:
    config = parse_config({"region": "us-east", "redis": {"url": session_servers[0].url}})
    async with clients({"us-east": config}) as redis_by_region:
        client = redis_by_region["us-east"]
        stream = f"{namespace}:linger"
        reader = GroupReader(client, stream, "g", "c", count=8, block_ms=100, linger_ms=LINGER_MS)
        await reader.ensure_group()
        await reader.read()  # the (empty) pending list; new entries from here on

        async def timed_read() -> tuple[list[Entry], float]:
            started = time.monotonic()
            entries = await reader.read()
            return entries, time.monotonic() - started

        await client.xadd(stream, {"n": "1"})
        first, took = await timed_read()
        assert len(first) == 1
        assert took < LINGER_MS / 1000  # after nothing: at once

        got: list[tuple[list[Entry], float]] = []
        async with anyio.create_task_group() as tg:

            async def read_into() -> None:
                got.append(await timed_read())

            tg.start_soon(read_into)
            for n in range(2, 6):
                await client.xadd(stream, {"n": str(n)})
        gathered, took = got[0]
        assert [fields[b"n"] for _, fields in gathered] == [b"2", b"3", b"4", b"5"]
        assert took >= LINGER_MS / 1000 * 0.95  # after one entry: it waited for more

        await client.xadd(stream, {"n": "6"})
        after_full, took = await timed_read()
        assert len(after_full) == 1
        assert took < LINGER_MS / 1000  # 4 of 8 is not small: at once
