"""One read per entry, fanned out in memory: a sender that falls behind the in-memory feed catches
up from its own cursor and joins again without a gap or a duplicate; a stalled peer holds up
neither the local apply nor the other peers."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import msgspec
import pytest
import redis.asyncio

from invalgw.config import CacheEndpoint
from invalgw.dev.localredis import RedisProcess, free_port
from invalgw.feed import FedBatch, Subscription
from invalgw.forward import BatchOut
from invalgw.names import Names
from invalgw.proto import (
    Batch,
    Invalidation,
    StreamId,
    decode_envelope,
    encode_envelope,
    entry_fields,
)
from invalgw.service import Gateway
from tests.conftest import (
    REGIONS,
    clients,
    make_configs,
    metric,
    proxied,
    running,
    stream_entries,
    via,
    wait_gone,
    wait_until,
)
from tests.processes import (
    Processes,
    all_gone,
    cache_keys,
    die_with_parent,
    sync_client,
    wait_for,
    write_burst,
)
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio


def urls_of(servers: list[RedisServer]) -> dict[str, str]:
    return {region: server.url for region, server in zip(REGIONS, servers, strict=True)}


async def mirror_events(client: redis.asyncio.Redis, mirror: str) -> list[bytes]:
    """Origin IDs of every invalidation in the batches of ``mirror``, in the order appended."""
    ids: list[bytes] = []
    for _, fields in await stream_entries(client, mirror):
        envelope = decode_envelope(fields[b"d"])
        if isinstance(envelope, Batch):
            ids += [event.id.encode() for event in envelope.events]
    return ids


async def test_a_sender_that_overflows_its_feed_catches_up_and_rejoins_in_order(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """With room for 8 batches in memory, a burst written while the link to ap-south is a black
    hole overflows that sender's feed: once the link heals it reads the stream from its cursor and
    joins the feed again. Every peer still gets every entry exactly once, in order, no gap."""
    urls = urls_of(session_servers)
    async with proxied(urls["ap-south"]) as slow:
        configs = make_configs(
            urls,
            namespace,
            peer_urls={"us-east": {"ap-south": via(slow, urls["ap-south"])}},
            gateway={"batch_size": 2, "feed_batches": 8, "trim_interval_ms": 600_000},
        )
        names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
        keys = [f"{namespace}:k{i}" for i in range(600)]
        async with clients(configs) as redis_by_region, running(configs) as gateways:
            east = redis_by_region["us-east"]
            for client in redis_by_region.values():
                await client.mset(dict.fromkeys(keys, "cached"))
            slow.blackhole()
            async with east.pipeline(transaction=False) as pipe:
                for i in range(0, len(keys), 2):
                    pipe.xadd(names.local_stream, entry_fields(keys[i : i + 2]))  # type: ignore[arg-type]
                written: list[bytes] = await pipe.execute()
            for region in ("us-east", "eu-west"):
                await wait_gone(redis_by_region[region], keys, region=region)
            slow.heal()
            await wait_gone(redis_by_region["ap-south"], keys, region="ap-south")
            catch_ups = metric(
                gateways["us-east"],
                "invalgw_sender_catch_ups_total",
                region="us-east",
                peer="ap-south",
            )
            assert catch_ups >= 2, "the sender to ap-south never fell behind the feed"
            # caught up, it is fed from memory again: no more reads of the stream
            more = [f"{namespace}:more{i}" for i in range(10)]
            await redis_by_region["ap-south"].mset(dict.fromkeys(more, "cached"))
            for key in more:
                written.append(await east.xadd(names.local_stream, entry_fields([key])))  # type: ignore[arg-type]
                await wait_gone(redis_by_region["ap-south"], [key], region="ap-south")
            labels = {"region": "us-east", "peer": "ap-south"}
            assert metric(gateways["us-east"], "invalgw_sender_catch_ups_total", **labels) == (
                catch_ups
            )
            for peer in ("eu-west", "ap-south"):

                async def delivered(peer: str = peer) -> bool:
                    sent = await mirror_events(redis_by_region[peer], names.mirror("us-east"))
                    return len(sent) >= len(written)

                await wait_until(delivered, what=f"every entry in {peer}'s mirror")
                sent = await mirror_events(redis_by_region[peer], names.mirror("us-east"))
                assert sent == written, f"{peer}: entries missing, repeated or out of order"
                assert await redis_by_region[peer].xlen(names.gaps) == 0


async def test_a_stalled_peer_holds_up_neither_the_local_apply_nor_the_other_peer(
    own_servers: list[RedisServer], namespace: str
) -> None:
    """ap-south's Redis is frozen (SIGSTOP): us-east keeps applying and eu-west keeps receiving
    at their usual pace; once ap-south thaws it gets everything."""
    configs = make_configs(urls_of(own_servers), namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    keys = [f"{namespace}:k{i}" for i in range(40)]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        await wait_until(
            _link_up(gateways["us-east"], "ap-south"), what="the link to ap-south to work first"
        )
        stalled = own_servers[REGIONS.index("ap-south")]
        stalled.pause()
        try:
            for key in keys:
                started = time.monotonic()
                await east.xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]
                await wait_gone(east, [key], region="us-east", seconds=1)
                await wait_gone(west, [key], region="eu-west", seconds=1)
                assert time.monotonic() - started < 1
        finally:
            stalled.resume()
        await wait_gone(redis_by_region["ap-south"], keys, region="ap-south", seconds=10)
        for peer in ("eu-west", "ap-south"):
            assert await redis_by_region[peer].xlen(names.gaps) == 0


def _link_up(gateway: Gateway, peer: str) -> Callable[[], Awaitable[bool]]:
    async def up() -> bool:
        return metric(gateway, "invalgw_link_up", region="us-east", peer=peer) == 1

    return up


@pytest.mark.e2e
def test_sigkill_with_batches_in_flight_loses_nothing(
    session_servers: list[RedisServer], namespace: str, processes: Processes
) -> None:
    """us-east pipelines batches to eu-west over a 100 ms link and is killed while replies are
    on their way: after a restart nothing is missing, and the re-sent batches eu-west already
    had are recognised as duplicates, not appended again."""
    urls = urls_of(session_servers)
    listen = free_port()
    target = urls["eu-west"].removeprefix("redis://").removesuffix("/0")
    proxy = subprocess.Popen(
        [
            *(sys.executable, "-m", "invalgw", "wan-proxy"),
            *(f"--listen=127.0.0.1:{listen}", f"--target={target}", "--delay-ms=100"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        configs = make_configs(
            urls,
            namespace,
            peer_urls={"us-east": {"eu-west": f"redis://127.0.0.1:{listen}/0"}},
            gateway={"batch_size": 20, "trim_interval_ms": 600_000},
        )
        names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
        redis_by_region = {region: sync_client(config) for region, config in configs.items()}
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        keys = [f"{namespace}:user:{i}" for i in range(3000)]
        cache_keys(redis_by_region.values(), keys)
        gateways = processes.start_all(configs)
        write_burst(east, names.local_stream, keys)
        wait_for(
            lambda: int(west.xlen(names.mirror("us-east"))) >= 20,
            what="eu-west to have accepted some batches",
        )
        gateways["us-east"].kill()
        accepted = StreamId.parse(west.hget(names.mirror_state("us-east"), "last") or b"0-0")
        saved = StreamId.parse(east.hget(names.link("eu-west"), "last") or b"0-0")
        assert accepted > saved, "no batch was in flight when us-east was killed"

        restarted = processes.add("us-east", configs["us-east"]).start().wait_ready()
        for region, client in redis_by_region.items():
            wait_for(partial(all_gone, client, keys), what=f"every key gone in {region}")
        restarted.wait_for_log("was already delivered")
        mirror: Any = west.xrange(names.mirror("us-east"))
        envelopes = [decode_envelope(fields[b"d"]) for _, fields in mirror]
        sent = {e.id for b in envelopes if isinstance(b, Batch) for e in b.events}
        assert len(sent) == len(keys) == east.xinfo_stream(names.local_stream)["entries-added"]
    finally:
        proxy.terminate()
        proxy.wait(timeout=5)


def test_events_encoded_once_make_the_same_envelope() -> None:
    """The envelope built around events encoded once for every peer is byte for byte the one
    built from the events, and reads back as a :class:`Batch`."""
    events = [
        Invalidation(id="1-1", op="unlink", keys=["a", "b"]),
        Invalidation(id="1-2", op="expire", keys=["c"], version="7", traceparent="00-x"),
    ]
    fields = {"origin": "us-east", "epoch": "e1", "prev": "0-0", "sent_ms": 5, "gap_to": "1-0"}
    raw = msgspec.Raw(msgspec.msgpack.encode(events))
    once = msgspec.msgpack.encode(BatchOut(events=raw, **fields))  # type: ignore[arg-type]
    assert once == encode_envelope(Batch(events=events, **fields))  # type: ignore[arg-type]
    assert decode_envelope(once) == Batch(events=events, **fields)  # type: ignore[arg-type]


def _fed(first: int, last: int, *, after: int | None) -> FedBatch:
    entries = [(f"1-{n}".encode(), {b"keys": b"k"}) for n in range(first, last + 1)]
    events = [
        Invalidation(id=f"1-{n}", op="unlink", keys=[f"k{n}"]) for n in range(first, last + 1)
    ]
    return FedBatch(
        after=None if after is None else StreamId.parse(f"1-{after}"),
        last=StreamId.parse(f"1-{last}"),
        entries=entries,
        events=events,
    )


def test_queued_batches_that_follow_each_other_go_out_as_one_envelope() -> None:
    """A sender whose window was full sends what queued meanwhile as one batch: only batches
    that directly follow, and no more entries than a batch may hold."""
    subscription = Subscription(bound=10)
    subscription.join()
    for batch in (
        _fed(3, 4, after=2),
        _fed(5, 7, after=4),
        _fed(9, 9, after=8),
        _fed(10, 10, after=9),
    ):
        subscription.offer(batch)
    first = subscription.get_nowait()
    assert first is not None
    one = subscription.take_following(first, most=10)
    assert (one.after, one.last) == (StreamId.parse("1-2"), StreamId.parse("1-7"))
    assert [event.id for event in one.events] == ["1-3", "1-4", "1-5", "1-6", "1-7"]
    assert [entry_id for entry_id, _ in one.entries] == [b"1-3", b"1-4", b"1-5", b"1-6", b"1-7"]
    after_gap = subscription.get_nowait()  # 1-8 was not in the feed: not merged across
    assert after_gap is not None
    assert subscription.take_following(after_gap, most=1).last == StreamId.parse("1-9")
    assert subscription.get_nowait() == _fed(10, 10, after=9)  # over ``most``: left queued


async def test_the_peers_keep_their_pace_while_the_local_apply_is_stuck(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """us-east cannot reach its cache, so its local apply reads no further and feeds nothing:
    each sender notices within a heartbeat interval and reads the stream itself."""
    configs = make_configs(urls_of(session_servers), namespace)
    unreachable = RedisProcess(preexec=die_with_parent)  # never started
    east_config = msgspec.structs.replace(
        configs["us-east"],
        cache=CacheEndpoint(
            url=unreachable.url, socket_timeout_ms=500, connect_timeout_ms=200, retries=0
        ),
    )
    configs = {**configs, "us-east": east_config}
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    keys = [f"{namespace}:k{i}" for i in range(10)]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        for key in keys:
            await redis_by_region["us-east"].xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]
        for region in ("eu-west", "ap-south"):
            await wait_gone(redis_by_region[region], keys, region=region)
        errors = metric(
            gateways["us-east"], "invalgw_redis_errors_total", region="us-east", target="us-east"
        )
        assert errors >= 1, "the local apply was expected to fail"
