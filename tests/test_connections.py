"""Clients from gateway.connections reach Redis over every URL scheme the config accepts, and
send exactly the bytes redis-py would."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from invalgw.config import RedisEndpoint
from invalgw.connections import Lane, call, close, connect, connect_sync, transaction
from tests.servers import redis_servers

pytestmark = pytest.mark.anyio


async def test_unix_socket_urls_connect(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    with redis_servers(1, "--unixsocket", str(socket_path)):
        endpoint = RedisEndpoint(url=f"unix://{socket_path}")
        client = connect(endpoint, name="invalgw:test")
        try:
            assert await client.ping()
        finally:
            await close(client)
        sync_client = connect_sync(endpoint, name="invalgw:test")
        try:
            assert sync_client.ping()
        finally:
            sync_client.close()


COMMANDS: list[tuple[Any, ...]] = [
    ("PING",),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT SETNAME", b"invalgw:us-east"),
    ("XACK", "s", "to:eu-west", *(f"1700000000000-{n}".encode() for n in range(600))),
    ("UNLINK", "caf\u00e9:1", "\u2603", b"\xff\x00"),
    ("SET", "k", 12, "PX", 2**70, "X", 1.5, 1e20, memoryview(b"mv")),
    ("EVALSHA", "ab" * 20, 2, "k1", "k2", b"x" * 100_000),
]


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///s"])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_commands_are_encoded_as_redis_py_encodes_them(url: str, command: tuple[Any, ...]) -> None:
    pool = connect(RedisEndpoint(url=url), name="test").connection_pool
    ours = pool.connection_class(**pool.connection_kwargs)
    theirs = redis.asyncio.Connection()
    assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))


def test_arguments_redis_py_refuses_are_still_refused() -> None:
    pool = connect(RedisEndpoint(url="redis://127.0.0.1:1/0"), name="test").connection_pool
    connection = pool.connection_class(**pool.connection_kwargs)
    with pytest.raises(redis.DataError):
        connection.pack_command("SET", "k", True)


async def test_a_transaction_to_a_frozen_redis_times_out_and_its_connection_is_not_reused() -> None:
    """The replies of a transaction share one deadline (the socket timeout): a Redis that stops
    answering mid-way costs a ``redis.TimeoutError`` after that long, not a wait for ever, and
    the next transaction, once it answers again, runs on a fresh connection."""
    with redis_servers(1) as (server,):
        endpoint = RedisEndpoint(url=server.url, socket_timeout_ms=300, retries=0)
        client = connect(endpoint, name="test")
        commands = [("SET", "k", "1"), ("INCR", "k")]
        assert await transaction(client, commands) == [b"OK", 2]
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                await transaction(client, commands)
            assert time.monotonic() - started < 3
        finally:
            server.resume()
        assert await transaction(client, [("GET", "k")]) in ([b"2"], [b"3"])
        await client.aclose()


async def test_a_lane_keeps_one_connection_and_connects_again_after_a_failure() -> None:
    """A stage's reads and acknowledgements go on one connection of its own (a lane), not one
    taken from the pool and given back each time; one the server dropped fails that call only,
    and the next one connects again; closing the lane gives the connection back to the pool."""
    with redis_servers(1) as (server,):
        client = connect(RedisEndpoint(url=server.url, retries=0), name="test")
        lane = Lane(client)
        first = await call(client, "CLIENT", "ID", lane=lane)
        assert await call(client, "CLIENT", "ID", lane=lane) == first
        assert await transaction(client, [("CLIENT", "ID")], lane=lane) == [first]
        await call(client, "CLIENT", "KILL", "ID", first)
        with pytest.raises(redis.ConnectionError):
            await call(client, "PING", lane=lane)
        again = await call(client, "CLIENT", "ID", lane=lane)
        assert again != first
        assert await call(client, "CLIENT", "ID", lane=lane) == again
        await lane.close()
        assert await call(client, "CLIENT", "ID") == again  # back in the pool, handed out next
        await client.aclose()
