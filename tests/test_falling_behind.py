"""Three ways a peer falls behind a capped stream, with gateways as processes: every lost ID is in
a recorded gap, the resync runs, and no invalidated key stays cached past its window.

us-east (the origin, ``streams.max_len = 1000``) reaches eu-west's Redis through a
:class:`WanProxy`. The checks use only what a user sees: the IDs written to us-east's stream, the
IDs inside the envelopes of eu-west's mirror stream, the gaps in ``<namespace>:gaps``, and keys.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis.asyncio

from invalgw.config import RegionConfig
from invalgw.dev.wanproxy import WanProxy
from invalgw.names import APPLY_GROUP, Names
from invalgw.proto import Batch, StreamId, decode_envelope, entry_fields
from invalgw.proto.envelope import ENVELOPE_FIELD
from invalgw.trim import cap_margin
from tests.conftest import clients, make_configs, proxied, via, wait_until
from tests.processes import Processes
from tests.servers import RedisServer, redis_servers

pytestmark = pytest.mark.anyio

MAX_LEN = 1000
RATE = 2500
ENTRIES = 5000
WINDOW_S = 10.0  # policy.expire_window_ms' upper bound: a resync's soft expiry lands by then


@pytest.fixture
def aof_servers() -> Iterator[list[RedisServer]]:
    """Two servers with AOF, so that a restart keeps streams and cached keys."""
    with redis_servers(2, "--appendonly", "yes") as servers:
        yield servers


@asynccontextmanager
async def east_and_west(
    servers: list[RedisServer], namespace: str, *, resync: bool = True
) -> AsyncIterator[tuple[dict[str, RegionConfig], WanProxy]]:
    urls = {"us-east": servers[0].url, "eu-west": servers[1].url}
    async with proxied(urls["eu-west"]) as proxy:
        yield (
            make_configs(
                urls,
                namespace,
                streams={"max_len": MAX_LEN},
                policy={"resync_patterns": [f"{namespace}:k:*"] if resync else []},
                peer_urls={"us-east": {"eu-west": via(proxy, urls["eu-west"])}},
            ),
            proxy,
        )


async def start(processes: Processes, configs: dict[str, RegionConfig]) -> None:
    started = [processes.add(name, config).start() for name, config in configs.items()]
    for process in started:
        await anyio.to_thread.run_sync(process.wait_ready)


class Run:
    """Writes ``ENTRIES`` two-key invalidations at ``RATE``; samples the stream's length."""

    def __init__(self, configs: dict[str, RegionConfig], namespace: str) -> None:
        self.stream = configs["us-east"].streams.local
        self.names = Names(configs["us-east"].streams.namespace, self.stream)
        self.keys = [f"{namespace}:k:{i}" for i in range(2 * ENTRIES)]
        self.written: list[bytes] = []
        self.longest = 0

    async def write(self, east: redis.asyncio.Redis) -> None:
        started = time.monotonic()
        chunk = RATE // 100
        for n in range(0, ENTRIES, chunk):
            async with east.pipeline(transaction=False) as pipe:
                for i in range(n, min(ENTRIES, n + chunk)):
                    pipe.xadd(self.stream, entry_fields(self.keys[2 * i : 2 * i + 2]))  # type: ignore[arg-type]
                pipe.xlen(self.stream)
                *ids, length = await pipe.execute()
            self.written += ids
            self.longest = max(self.longest, int(length))
            await anyio.sleep(max(0.0, started + (n + chunk) / RATE - time.monotonic()))

    async def watch(self, west: redis.asyncio.Redis) -> None:
        """A consumer group that never reads holds eu-west's trimming of the mirror back, so that
        the test sees every envelope that arrived."""
        await west.xgroup_create(self.names.mirror("us-east"), "test", id="0", mkstream=True)

    async def delivered(self, west: redis.asyncio.Redis) -> set[bytes]:
        """The origin IDs in eu-west's mirror of us-east."""
        ids: set[bytes] = set()
        entries: Any = await west.xrange(self.names.mirror("us-east"))
        for _, fields in entries:
            envelope = decode_envelope(fields[ENVELOPE_FIELD])
            if isinstance(envelope, Batch):
                ids.update(event.id.encode() for event in envelope.events)
        return ids

    async def gaps(self, west: redis.asyncio.Redis) -> list[tuple[StreamId, StreamId]]:
        ranges = []
        entries: Any = await west.xrange(self.names.gaps)
        for _, fields in entries:
            if fields[b"origin"] != b"us-east":
                continue
            upto = fields[b"upto"]
            top = StreamId(2**64, 0) if upto == b"unknown" else StreamId.parse(upto)
            ranges.append((StreamId.parse(fields[b"after"]), top))
        return ranges

    async def check(self, east: redis.asyncio.Redis, west: redis.asyncio.Redis) -> int:
        """Wait until everything written reached eu-west or is in a gap; then until no key is
        cached there. Returns how many entries were lost."""
        lost: list[bytes] = []

        async def accounted() -> bool:
            nonlocal lost
            try:
                delivered = await self.delivered(west)
            except redis.ConnectionError:  # the test's connection to a restarted Redis
                return False
            ranges = await self.gaps(west)
            lost = [i for i in self.written if i not in delivered]
            uncovered[:] = [
                i for i in lost if not any(a < StreamId.parse(i) <= u for a, u in ranges)
            ]
            return not uncovered

        uncovered: list[bytes] = []
        try:
            await wait_until(accounted, seconds=60, what="every lost ID to be in a recorded gap")
        except BaseException:
            print("not delivered, in no gap:", len(uncovered), uncovered[:3], uncovered[-3:])
            print("gaps:", await self.gaps(west))
            raise

        async def nothing_cached() -> bool:
            return int(await west.exists(*self.keys)) == 0

        await wait_until(nothing_cached, seconds=20 + WINDOW_S, what="no key cached in eu-west")
        return len(lost)


async def fall_behind(
    servers: list[RedisServer],
    processes: Processes,
    namespace: str,
    behind: Callable[[WanProxy], Awaitable[None]],
    back: Callable[[WanProxy], Awaitable[None]],
    *,
    resync: bool = True,
) -> Run:
    async with east_and_west(servers, namespace, resync=resync) as (configs, proxy):
        run = Run(configs, namespace)
        async with clients(configs) as by_region:
            east, west = by_region["us-east"], by_region["eu-west"]
            await west.mset(dict.fromkeys(run.keys, "cached"))
            await run.watch(west)
            await start(processes, configs)
            await behind(proxy)
            await run.write(east)
            await back(proxy)
            lost = await run.check(east, west)
        print(f"{ENTRIES} written, {lost} lost, longest stream {run.longest} (cap {MAX_LEN})")
        assert lost > 0, "the peer was meant to fall behind the cap"
        assert run.longest <= MAX_LEN + cap_margin(MAX_LEN)
    return run


async def test_a_blackholed_link_loses_entries_to_the_cap_and_the_gap_covers_them(
    own_servers: list[RedisServer], processes: Processes, namespace: str
) -> None:
    async def blackhole(proxy: WanProxy) -> None:
        proxy.blackhole()

    async def heal(proxy: WanProxy) -> None:
        proxy.heal()

    await fall_behind(own_servers, processes, namespace, blackhole, heal)


async def test_a_slow_link_loses_entries_to_the_cap_and_the_gap_covers_them(
    own_servers: list[RedisServer], processes: Processes, namespace: str
) -> None:
    """0.3 s each way: the link works, only too slowly for 2,500/s; nothing is ever pending at
    the moment it is trimmed, yet every entry trimmed before it was read is in a gap."""

    async def slow(proxy: WanProxy) -> None:
        proxy.set_delay(300)

    async def still_slow(proxy: WanProxy) -> None:
        pass

    await fall_behind(own_servers, processes, namespace, slow, still_slow)


async def test_a_stopped_peer_redis_loses_entries_and_the_gap_covers_them(
    aof_servers: list[RedisServer], processes: Processes, namespace: str
) -> None:
    west = aof_servers[1]

    async def stop(_proxy: WanProxy) -> None:
        west.terminate()

    async def restart(_proxy: WanProxy) -> None:
        west.restart()

    await fall_behind(aof_servers, processes, namespace, stop, restart)


async def test_without_resync_patterns_the_gap_is_still_recorded(
    own_servers: list[RedisServer], processes: Processes, namespace: str
) -> None:
    async with east_and_west(own_servers, namespace, resync=False) as (configs, proxy):
        run = Run(configs, namespace)
        async with clients(configs) as by_region:
            east, west = by_region["us-east"], by_region["eu-west"]
            await run.watch(west)
            await start(processes, configs)
            proxy.blackhole()
            await run.write(east)
            proxy.heal()

            async def covered() -> bool:
                delivered = await run.delivered(west)
                ranges = await run.gaps(west)
                lost = [StreamId.parse(i) for i in run.written if i not in delivered]
                return bool(lost) and all(any(a < i <= u for a, u in ranges) for i in lost)

            await wait_until(covered, seconds=60, what="the lost IDs to be in a recorded gap")


async def test_restarting_each_region_s_redis_under_load_records_no_gap(
    aof_servers: list[RedisServer], processes: Processes, namespace: str
) -> None:
    """Graceful restarts with AOF lose nothing, so they must not look like a loss: no gap (a
    false gap costs every key under resync_patterns a refill), and no key stays cached."""
    urls = {"us-east": aof_servers[0].url, "eu-west": aof_servers[1].url}
    configs = make_configs(urls, namespace, policy={"resync_patterns": [f"{namespace}:k:*"]})
    keys = {region: [f"{namespace}:k:{region}:{i}" for i in range(3000)] for region in urls}
    everything = [key for region_keys in keys.values() for key in region_keys]
    async with clients(configs) as by_region:
        for client in by_region.values():
            await client.mset(dict.fromkeys(everything, "cached"))
        await start(processes, configs)

        writers = [Writer(by_region[region], configs[region].streams.local) for region in urls]
        async with anyio.create_task_group() as tg:
            for writer, region in zip(writers, urls, strict=True):
                tg.start_soon(writer.write_through_restarts, keys[region])
            tg.start_soon(restart_each_twice, aof_servers, writers)

        for region, client in by_region.items():
            await wait_until(
                partial(none_exist, client, everything),
                seconds=60,
                what=f"every key to be gone in {region}",
            )
        for region, client in by_region.items():
            gaps: Any = await client.xrange(Names(configs[region].streams.namespace, "").gaps)
            assert gaps == [], f"{region} recorded gaps: {gaps}"


class Writer:
    """Writes one region's invalidations through the restarts; keeps the IDs written."""

    def __init__(self, client: redis.asyncio.Redis, stream: str) -> None:
        self.client = client
        self.stream = stream
        self.written: list[bytes] = []
        self.done = False

    async def write_through_restarts(self, keys: list[str]) -> None:
        """One invalidation per key, 10 every 20 ms (500/s); a write that fails is tried again."""
        for n in range(0, len(keys), 10):
            while True:
                try:
                    async with self.client.pipeline(transaction=False) as pipe:
                        for key in keys[n : n + 10]:
                            pipe.xadd(self.stream, entry_fields([key]))  # type: ignore[arg-type]
                        ids: list[bytes] = await pipe.execute()
                    break
                except redis.ConnectionError:  # that Redis is restarting
                    await anyio.sleep(0.05)
            self.written += ids
            await anyio.sleep(0.02)  # the pace of the load, not a wait for anything
        self.done = True

    async def applied(self, entry_id: bytes) -> bool:
        """Whether the region's gateway has read ``entry_id`` for its local apply."""
        try:
            groups: Any = await self.client.xinfo_groups(self.stream)
        except redis.ConnectionError:  # the test's connection to a restarted Redis
            return False
        return any(
            group["name"] == APPLY_GROUP.encode()
            and StreamId.parse(group["last-delivered-id"]) >= StreamId.parse(entry_id)
            for group in groups
        )


WRITES_BETWEEN_RESTARTS = 400
"""Each region writes this many invalidations (some 0.8 s) between two restarts, and its gateway
reads the last of them, so that each restart meets gateways at work, not still reconnecting."""


async def restart_each_twice(servers: list[RedisServer], writers: list[Writer]) -> None:
    """A graceful restart (SIGTERM: the AOF is flushed) of each server in turn, twice, each once
    every region wrote and applied more since the last one."""
    for server in [*servers, *servers]:
        marks = [len(writer.written) + WRITES_BETWEEN_RESTARTS for writer in writers]

        async def progressed(marks: list[int] = marks) -> bool:
            for writer, mark in zip(writers, marks, strict=True):
                if len(writer.written) < mark and not writer.done:
                    return False
                if not await writer.applied(writer.written[min(mark, len(writer.written)) - 1]):
                    return False
            return True

        await wait_until(progressed, seconds=30, what="writes and applies since the last restart")
        await anyio.to_thread.run_sync(server.terminate)
        await anyio.to_thread.run_sync(server.restart)


async def none_exist(client: redis.asyncio.Redis, keys: list[str]) -> bool:
    try:
        return int(await client.exists(*keys)) == 0
    except redis.ConnectionError:  # the test's connection to a restarted Redis
        return False
