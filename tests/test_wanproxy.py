"""The loopback WAN proxy, against a real Redis: delay, blackhole, reset, refuse, heal."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from invalgw.connections import close
from invalgw.dev.localredis import free_port
from invalgw.dev.wanproxy import CHUNK_BYTES, QUEUE_CHUNKS, WanProxy, send_command
from tests.conftest import proxied, via, wait_until
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio


def connect(url: str, *, timeout: float = 2.0) -> redis.asyncio.Redis:
    """A client that fails after ``timeout`` and never retries, so each failure shows."""
    return redis.asyncio.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


@pytest.fixture
def redis_url(session_servers: list[RedisServer]) -> str:
    return session_servers[0].url


async def elapsed(call: Callable[[], Awaitable[object]]) -> float:
    start = time.monotonic()
    await call()
    return time.monotonic() - start


async def round_trip(client: redis.asyncio.Redis) -> float:
    """The fastest of a few PINGs: what the link adds, without the machine's noise."""
    return min([await elapsed(client.ping) for _ in range(3)])


async def test_forwards_many_connections_and_large_values(redis_url: str, namespace: str) -> None:
    async with proxied(redis_url) as proxy:
        clients = [connect(via(proxy, redis_url)) for _ in range(60)]
        try:

            async def use(i: int, client: redis.asyncio.Redis) -> None:
                await client.set(f"{namespace}:{i}", i)
                assert await client.get(f"{namespace}:{i}") == str(i).encode()

            async with anyio.create_task_group() as tg:
                for i, client in enumerate(clients):
                    tg.start_soon(use, i, client)
            assert proxy.connections == len(clients)

            value = os.urandom(20 * CHUNK_BYTES)  # many chunks each way
            await clients[0].set(f"{namespace}:big", value)
            assert await clients[0].get(f"{namespace}:big") == value
        finally:
            for client in clients:
                await close(client)
        await wait_until(
            lambda: _true(proxy.connections == 0), what="closed clients to be closed in the proxy"
        )


async def test_delay_is_added_each_way_and_bytes_keep_their_order(
    redis_url: str, namespace: str
) -> None:
    async with proxied(redis_url, delay_ms=50) as proxy:
        client = connect(via(proxy, redis_url))
        try:
            assert await round_trip(client) >= 0.1  # 50 ms out, 50 ms back

            proxy.set_delay(0, direction="downstream")
            assert 0.05 <= await round_trip(client) < 0.1

            # chunks get different delays, but arrive in the order they were read
            proxy.set_delay(20, jitter_ms=20)
            values = {f"{namespace}:{i}": os.urandom(30_000) for i in range(100)}
            async with client.pipeline(transaction=False) as pipe:
                for key, value in values.items():
                    pipe.set(key, value)
                    pipe.get(key)
                replies = await pipe.execute()
            assert replies[1::2] == list(values.values())

            proxy.set_delay(0)
            assert await round_trip(client) < 0.05
        finally:
            await close(client)


async def test_blackhole_times_calls_out_and_heal_restores(redis_url: str, namespace: str) -> None:
    key = f"{namespace}:late"
    direct = connect(redis_url)
    async with proxied(redis_url) as proxy:
        client = connect(via(proxy, redis_url), timeout=0.3)
        await client.ping()
        proxy.blackhole()
        start = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            await client.set(key, "sent during the blackhole")
        assert 0.25 <= time.monotonic() - start < 1.5
        fresh = connect(via(proxy, redis_url), timeout=0.3)
        with pytest.raises(redis.TimeoutError):  # new connections are accepted, then silent
            await fresh.ping()
        assert not await direct.exists(key)

        proxy.heal()
        assert await client.ping()
        assert await fresh.ping()
        # the SET that timed out was held, not lost: like on a real WAN it lands late
        await wait_until(
            lambda: _exists(direct, key), what="the timed-out SET to land after the heal"
        )
        for each in (client, fresh, direct):
            await close(each)


async def test_reset_fails_a_call_in_flight_at_once(redis_url: str, namespace: str) -> None:
    direct = connect(redis_url)
    async with proxied(redis_url) as proxy:
        client = connect(via(proxy, redis_url), timeout=10)
        failed_after: list[float] = []

        async def blocked_call() -> None:
            with pytest.raises(redis.ConnectionError):
                await client.blpop([f"{namespace}:never"], timeout=8)
            failed_after.append(time.monotonic() - reset_at)

        async def blocked() -> bool:
            clients = await direct.client_list()
            return any(c["cmd"] == "blpop" for c in clients)

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked_call)
            await wait_until(blocked, what="the BLPOP to block in Redis")
            reset_at = time.monotonic()
            assert proxy.reset_connections() == 1
        assert failed_after[0] < 0.5
        assert await client.ping()  # the next call reconnects
        await close(client)
    await close(direct)


async def test_refuse_fails_new_connections_at_once_and_heal_reopens(redis_url: str) -> None:
    async with proxied(redis_url) as proxy:
        connected = connect(via(proxy, redis_url))
        await connected.ping()
        proxy.refuse()
        fresh = connect(via(proxy, redis_url))
        start = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            await fresh.ping()
        assert time.monotonic() - start < 0.5
        assert await connected.ping()  # connections made before stay up

        proxy.heal()
        assert await fresh.ping()
        for each in (connected, fresh):
            await close(each)


async def test_a_blackholed_sender_is_pushed_back_and_nothing_is_lost() -> None:
    """No unbounded buffering: the proxy stops reading, TCP pushes back on the sender; after the
    heal every byte arrives, in order."""
    received = hashlib.sha256()
    received_bytes = 0
    sink = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = sink.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 - not Django

    async def drain(stream: anyio.abc.SocketStream) -> None:
        nonlocal received_bytes
        async with stream:
            async for chunk in stream:
                received.update(chunk)
                received_bytes += len(chunk)

    sent = hashlib.sha256()
    sent_bytes = 0
    async with sink, anyio.create_task_group() as tg:
        tg.start_soon(sink.serve, drain)
        async with proxied(f"redis://127.0.0.1:{port}") as proxy:
            proxy.blackhole()
            chunk = os.urandom(256 * 1024)
            with socket.create_connection(("127.0.0.1", proxy.port)) as sender:
                sender.setblocking(False)
                with anyio.move_on_after(1):  # GBs on loopback if nothing pushed back
                    while sent_bytes < 512 * 1024 * 1024:
                        try:
                            count = sender.send(chunk)
                        except BlockingIOError:
                            await anyio.wait_writable(sender)
                            continue
                        sent.update(chunk[:count])
                        sent_bytes += count
                        await anyio.lowlevel.checkpoint()
                assert sent_bytes < 64 * 1024 * 1024  # kernel buffers and a few proxy chunks
                # the queue, the chunk its writer holds, the one its reader waits to queue
                assert proxy.buffered_bytes <= (QUEUE_CHUNKS + 2) * CHUNK_BYTES
                assert received_bytes == 0

                proxy.heal()
                sender.shutdown(socket.SHUT_WR)
                await wait_until(
                    lambda: _true(received_bytes == sent_bytes),
                    seconds=30,
                    what="every byte to arrive",
                )
            assert received.digest() == sent.digest()
        tg.cancel_scope.cancel()


def test_control_commands() -> None:
    proxy = WanProxy("127.0.0.1", 6379)
    assert proxy.command("delay 40 5").startswith("ok state=normal connections=0 delay_ms=40/40")
    assert "delay_ms=40/0 jitter_ms=5/0" in proxy.command("delay 0 0 downstream")
    assert proxy.command("blackhole").startswith("ok state=blackhole ")
    assert proxy.command("refuse").startswith("ok state=blackhole+refusing ")
    assert proxy.command("heal").startswith("ok state=normal ")
    assert proxy.command("delay -1").startswith("error: ")
    assert proxy.command("delay 10 1 sideways").startswith("error: direction")
    assert proxy.command("explode").startswith("error: unknown command 'explode'")


@pytest.mark.e2e
async def test_cli_proxy_obeys_its_control_port_and_stops_on_sigterm(redis_url: str) -> None:
    listen, control = free_port(), free_port()
    target = redis_url.removeprefix("redis://").removesuffix("/0")
    process = await anyio.open_process(
        [
            sys.executable,
            "-m",
            "gateway",
            "wan-proxy",
            f"--listen=127.0.0.1:{listen}",
            f"--target={target}",
            "--delay-ms=20",
            f"--control=127.0.0.1:{control}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = connect(f"redis://127.0.0.1:{listen}/0", timeout=0.3)
    try:

        async def answers() -> bool:
            try:
                return bool(await client.ping())
            except redis.ConnectionError:
                return False

        await wait_until(answers, what="the proxy to forward")
        assert await round_trip(client) >= 0.04

        async def ctl(*words: str) -> subprocess.CompletedProcess[bytes]:
            argv = [sys.executable, "-m", "invalgw", "wan-proxy-ctl"]
            return await anyio.run_process(
                [*argv, f"--control=127.0.0.1:{control}", *words], check=False
            )

        done = await ctl("blackhole")
        assert done.returncode == 0
        assert done.stdout.startswith(b"ok state=blackhole")
        with pytest.raises(redis.TimeoutError):
            await client.ping()
        assert send_command(("127.0.0.1", control), "heal").startswith("ok state=normal")
        assert await client.ping()
        assert (await ctl("dance")).returncode == 1

        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(5):
            assert await process.wait() == 0
    finally:
        await close(client)
        if process.returncode is None:
            process.kill()
        await process.aclose()


async def _true(value: bool) -> bool:
    return value


async def _exists(client: redis.asyncio.Redis, key: str) -> bool:
    return bool(await client.exists(key))
