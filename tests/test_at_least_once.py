"""Nothing lost, nothing looped, duplicates recognised.

- A gateway SIGKILLed in the middle of a burst, started again (under its own name or another),
  still applies every invalidation in every region: entries are acknowledged only after their
  effect, and pending entries are taken over with XAUTOCLAIM at start and periodically.
- An invalidation applied from a mirror is never forwarded again.
- A batch re-sent to a peer (the acknowledgement after delivery was lost) is recognised there.
"""

from __future__ import annotations

from functools import partial

import msgspec
import pytest
import redis.asyncio

from invalgw.apply import parse_batch
from invalgw.clock import ServerClock
from invalgw.config import RegionConfig
from invalgw.conflate import conflate
from invalgw.epoch import Epoch
from invalgw.feed import FedBatch
from invalgw.forward import Forwarder
from invalgw.metrics import Metrics
from invalgw.names import APPLY_GROUP, Names, forward_group
from invalgw.proto import Batch, Limits, StreamId, decode_envelope, entry_fields
from invalgw.read import Entry, GroupReader
from invalgw.service import Gateway
from invalgw.stages import Drain
from invalgw.tracing import InvalidationTracer
from invalgw.trim import trim_stream
from tests.conftest import (
    REGIONS,
    clients,
    make_configs,
    metric,
    running,
    stream_entries,
    wait_gone,
    wait_until,
)
from tests.processes import (
    Processes,
    all_gone,
    cache_keys,
    groups,
    settled,
    sync_client,
    wait_for,
    write_burst,
)
from tests.servers import RedisServer

BURST = 20_000


def urls_of(servers: list[RedisServer]) -> dict[str, str]:
    return {region: server.url for region, server in zip(REGIONS, servers, strict=True)}


def with_consumer(config: RegionConfig, consumer: str) -> RegionConfig:
    return msgspec.structs.replace(
        config, gateway=msgspec.structs.replace(config.gateway, consumer=consumer)
    )


@pytest.mark.e2e
def test_sigkill_mid_burst_loses_nothing(
    session_servers: list[RedisServer], namespace: str, processes: Processes
) -> None:
    """Kill us-east's gateway twice in a 20,000-invalidation burst; restart it as the same
    consumer, then as another one (the host changed): every key goes in every region."""
    configs = make_configs(urls_of(session_servers), namespace, gateway={"batch_size": 200})
    redis_by_region = {region: sync_client(config) for region, config in configs.items()}
    east, stream = redis_by_region["us-east"], configs["us-east"].streams.local
    keys = [f"{namespace}:user:{i}" for i in range(BURST)]
    cache_keys(redis_by_region.values(), keys)
    gateways = processes.start_all({r: with_consumer(c, "host-a") for r, c in configs.items()})

    def applied_at_least(count: int) -> bool:
        return int(groups(east, stream)[APPLY_GROUP]["entries-read"] or 0) >= count

    write_burst(east, stream, keys)
    wait_for(lambda: applied_at_least(BURST // 5), what="a fifth of the burst to be read")
    gateways["us-east"].kill()
    processes.add("us-east", with_consumer(configs["us-east"], "host-a")).start().wait_ready()
    wait_for(lambda: applied_at_least(BURST // 2), what="half of the burst to be read")
    processes.all[-1].kill()

    # The dead host-a also leaves entries it read and never handled, in every group (written
    # now: a sender reading the stream itself may have sent the whole burst already).
    late = [f"{namespace}:late:{i}" for i in range(100)]
    cache_keys(redis_by_region.values(), late)
    write_burst(east, stream, late)
    keys += late
    for group in groups(east, stream):
        east.xreadgroup(group, "host-a", {stream: ">"}, count=50)
    assert all(info["pending"] > 0 for info in groups(east, stream).values())
    processes.add("us-east", with_consumer(configs["us-east"], "host-b")).start().wait_ready()

    for region, client in redis_by_region.items():
        wait_for(partial(all_gone, client, keys), what=f"every key gone in {region}")
    wait_for(lambda: settled(east, stream), what="every group of us-east to be settled")
    for group in groups(east, stream):
        assert east.xpending_range(stream, group, "-", "+", 10, consumername="host-a") == []


@pytest.mark.anyio
async def test_periodic_claim_takes_over_a_dead_consumers_entries(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """Entries another consumer read and never acknowledged are taken over once idle."""
    configs = make_configs(
        urls_of(session_servers),
        namespace,
        gateway={"claim_idle_ms": 300, "claim_interval_ms": 100},
    )
    stream = configs["us-east"].streams.local
    keys = [f"{namespace}:k{i}" for i in range(20)]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        east = redis_by_region["us-east"]
        # Written and read by a consumer that then dies, in one transaction: the running
        # gateway never sees these entries as new.
        async with east.pipeline(transaction=True) as pipe:
            for i in range(0, len(keys), 2):
                pipe.xadd(stream, entry_fields(keys[i : i + 2]))  # type: ignore[arg-type]
            for group in (APPLY_GROUP, forward_group("eu-west"), forward_group("ap-south")):
                pipe.xreadgroup(group, "dead-host", {stream: ">"})
            await pipe.execute()

        for region, client in redis_by_region.items():
            await wait_gone(client, keys, region=region)

        def reclaimed() -> list[float]:
            return [
                metric(
                    gateways["us-east"],
                    "invalgw_entries_reclaimed_total",
                    region="us-east",
                    group=stage,
                )
                for stage in ("apply", "to:eu-west", "to:ap-south")
            ]

        async def each_took_over() -> bool:
            # a sender's claim may come after the keys went: the local apply's claim fed it
            return min(reclaimed()) >= 10

        await wait_until(each_took_over, what="every stage to take over the dead consumer's")
        assert reclaimed() == [10, 10, 10]

        async def nothing_pending() -> bool:
            summary = await east.xpending(stream, APPLY_GROUP)
            return int(summary["pending"]) == 0

        await wait_until(nothing_pending, what="no pending entries")


async def mirror_events(client: redis.asyncio.Redis, mirror: str) -> list[str]:
    """Origin IDs of every invalidation carried by the batches in ``mirror``."""
    ids: list[str] = []
    for _, fields in await stream_entries(client, mirror):
        envelope = decode_envelope(fields[b"d"])
        if isinstance(envelope, Batch):
            ids += [event.id for event in envelope.events]
    return ids


@pytest.mark.anyio
async def test_resent_batch_is_recognised_as_duplicate(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """us-east delivers, then loses its acknowledgements and its link state (as when it crashes
    between the peer's reply and its XACK): the batches it sends again are not added twice."""
    configs = make_configs(
        urls_of(session_servers),
        namespace,
        gateway={"batch_size": 50, "trim_interval_ms": 600_000},
    )
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    keys = [f"{namespace}:k{i}" for i in range(300)]
    async with clients(configs) as redis_by_region, running(configs, "eu-west", "ap-south"):
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        for i in range(0, len(keys), 3):
            await east.xadd(names.local_stream, entry_fields(keys[i : i + 3]))  # type: ignore[arg-type]
        async with running(configs, "us-east"):
            for client in redis_by_region.values():
                await wait_gone(client, keys, region="any")
        sent = await mirror_events(west, names.mirror("us-east"))
        assert len(sent) == len(set(sent)) == 100

        await east.xgroup_setid(names.local_stream, forward_group("eu-west"), "0")
        await east.delete(names.link("eu-west"))
        async with running(configs, "us-east") as gateways:

            async def caught_up() -> bool:
                info = {g["name"]: g for g in await east.xinfo_groups(names.local_stream)}
                group = info[forward_group("eu-west").encode()]
                return int(group["pending"]) == 0 and group["lag"] == 0

            await wait_until(caught_up, what="us-east to have re-sent everything to eu-west")
            link = {"region": "us-east", "peer": "eu-west"}
            east_gateway = gateways["us-east"]
            # batches queued behind a full window go out merged: one envelope or several
            assert metric(east_gateway, "invalgw_duplicate_batches_total", **link) >= 1
            assert metric(east_gateway, "invalgw_invalidations_forwarded_total", **link) == 0
        assert await mirror_events(west, names.mirror("us-east")) == sent


@pytest.mark.anyio
async def test_mirrored_invalidations_are_never_forwarded_again(
    session_servers: list[RedisServer], namespace: str
) -> None:
    configs = make_configs(
        urls_of(session_servers), namespace, gateway={"trim_interval_ms": 600_000}
    )
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    written = {"us-east": 60, "eu-west": 25, "ap-south": 0}
    keys = {
        region: [f"{namespace}:{region}:{i}" for i in range(n)] for region, n in written.items()
    }
    everything = [key for region_keys in keys.values() for key in region_keys]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(everything, "cached"))
        for region, region_keys in keys.items():
            for key in region_keys:
                await redis_by_region[region].xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]
        for region, client in redis_by_region.items():
            await wait_gone(client, everything, region=region)

        async def heartbeats(region: str, origin: str) -> int:
            return int(await redis_by_region[region].xlen(names.mirror(origin)))

        await no_loop(redis_by_region, gateways, names, written)
        # Let several heartbeat rounds pass: a loop would keep adding entries.
        before = await heartbeats("ap-south", "eu-west")

        async def five_more() -> bool:
            return await heartbeats("ap-south", "eu-west") >= before + 5

        await wait_until(five_more, what="five more heartbeats")
        await no_loop(redis_by_region, gateways, names, written)


async def no_loop(
    redis_by_region: dict[str, redis.asyncio.Redis],
    gateways: dict[str, Gateway],
    names: Names,
    written: dict[str, int],
) -> None:
    """Each region's stream holds only what was written there, each mirror exactly its
    origin's invalidations, and each gateway forwarded only its own."""
    for region, client in redis_by_region.items():
        info = await client.xinfo_stream(names.local_stream)
        assert info["entries-added"] == written[region], region
        for origin in (other for other in REGIONS if other != region):
            mirror = names.mirror(origin)
            for _, fields in await stream_entries(client, mirror):
                assert decode_envelope(fields[b"d"]).origin == origin
            assert len(await mirror_events(client, mirror)) == written[origin], (region, origin)
            forwarded = metric(
                gateways[region],
                "invalgw_invalidations_forwarded_total",
                region=region,
                peer=origin,
            )
            assert forwarded == written[region], (region, origin)


async def gap_records(client: redis.asyncio.Redis, stream: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in await stream_entries(client, stream)
    ]


@pytest.mark.anyio
async def test_pending_entries_deleted_before_handling_become_gaps(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """A dead consumer's pending entry that was deleted (XDEL, or trimmed at the hard cap) cannot
    be applied or forwarded any more: every region records the gap instead of skipping it."""
    configs = make_configs(urls_of(session_servers), namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    stream = names.local_stream
    keys = [f"{namespace}:k{i}" for i in range(3)]
    async with clients(configs) as redis_by_region:
        east = redis_by_region["us-east"]
        ids: list[bytes] = [
            await east.xadd(stream, entry_fields([key]))  # type: ignore[arg-type,misc]
            for key in keys
        ]
        for group in (APPLY_GROUP, forward_group("eu-west"), forward_group("ap-south")):
            await east.xgroup_create(stream, group, id="0")
            await east.xreadgroup(group, "dead-host", {stream: ">"})
        await east.xdel(stream, ids[1])
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))

        async with running(configs):
            for region, client in redis_by_region.items():
                await wait_gone(client, [keys[0], keys[2]], region=region)

                async def gap_recorded(client: redis.asyncio.Redis = client) -> bool:
                    return bool(await client.xlen(names.gaps))

                await wait_until(gap_recorded, what=f"a gap recorded in {region}")
                [gap] = await gap_records(client, names.gaps)
                assert (gap["origin"], gap["region"]) == ("us-east", region)
                assert gap["upto"] == ids[1].decode()
                after = StreamId.parse(gap["after"])
                assert StreamId.parse(ids[0]) <= after < StreamId.parse(ids[1])
            # keys[1] was never applied anywhere: the gap is what tells the operator to resync
            assert await east.exists(keys[1]) == 1


@pytest.mark.anyio
async def test_gap_sent_with_a_duplicate_batch_still_reaches_the_peer(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    """A forwarder restarted after a crash re-sends its last batch, now carrying a gap noted
    meanwhile. The peer drops the batch as a duplicate; the gap must reach it all the same."""
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    stream = names.local_stream
    async with clients(configs) as redis_by_region:
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        epoch = Epoch(east, names.epoch)
        await epoch.load()
        clock = ServerClock()
        await clock.sample(east)
        reader = GroupReader(east, stream, forward_group("eu-west"), "t", count=10, block_ms=100)
        await reader.ensure_group()
        metrics = Metrics("us-east")

        def forwarder() -> Forwarder:
            return Forwarder(
                region="us-east",
                peer="eu-west",
                reader=reader,
                local=east,
                remote=west,
                names=names,
                epoch=epoch,
                clock=clock,
                metrics=metrics,
                limits=Limits(),
                mirror_max_len=1000,
                heartbeat_interval_ms=1000,
                drain=Drain(),
                tracer=InvalidationTracer("us-east"),
            )

        async def next_batch() -> list[Entry]:
            entries = await reader.read()
            return entries or await reader.read()

        for i in range(3):
            await east.xadd(stream, entry_fields([f"{namespace}:k{i}"]))  # type: ignore[arg-type]
        first = forwarder()
        await first.load()
        await first(await next_batch())
        # The acknowledgement is lost (crash): the group hands the same entries out again.
        await east.xgroup_setid(stream, forward_group("eu-west"), "0")
        second = forwarder()
        await second.load()
        await second.add_gap("1-0", "1-5")
        await second(await next_batch())

        duplicates = metrics.registry.get_sample_value(
            "invalgw_duplicate_batches_total", {"region": "us-east", "peer": "eu-west"}
        )
        assert duplicates == 1
        envelopes = [
            decode_envelope(fields[b"d"])
            for _, fields in await stream_entries(west, names.mirror("us-east"))
        ]
        assert [len(e.events) for e in envelopes if isinstance(e, Batch)] == [3, 0]
        assert [(e.gap_from, e.gap_to) for e in envelopes if isinstance(e, Batch)] == [
            (None, None),
            ("1-0", "1-5"),
        ]
        assert set(await east.hgetall(names.link("eu-west"))) == {b"epoch", b"last"}


@pytest.mark.anyio
async def test_a_fed_batch_partly_sent_keeps_the_invalidations_conflation_folded(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    """The local apply read ``unlink k`` and a later ``expire k`` as one batch and conflated
    them into the unlink (the stronger effect, applied once for both). A sender that had
    already sent the unlink on its own (it read the stream itself up to there) must still send
    the expire: the peer applied the unlink before it was written, and may have cached ``k``
    again since."""
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    stream = names.local_stream
    key = f"{namespace}:k"
    async with clients(configs) as redis_by_region:
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        epoch = Epoch(east, names.epoch)
        await epoch.load()
        clock = ServerClock()
        await clock.sample(east)
        reader = GroupReader(east, stream, forward_group("eu-west"), "t", count=10, block_ms=100)
        sender = Forwarder(
            region="us-east",
            peer="eu-west",
            reader=reader,
            local=east,
            remote=west,
            names=names,
            epoch=epoch,
            clock=clock,
            metrics=Metrics("us-east"),
            limits=Limits(),
            mirror_max_len=1000,
            heartbeat_interval_ms=1000,
            drain=Drain(),
            tracer=InvalidationTracer("us-east"),
        )
        await sender.start()
        first: bytes = await east.xadd(stream, entry_fields([key], op="unlink"))  # type: ignore[arg-type,assignment]
        await sender._catch_up(StreamId.parse(first))  # the sender read the stream up to here
        later: bytes = await east.xadd(stream, entry_fields([key], op="expire"))  # type: ignore[arg-type,assignment]

        entries: list[Entry] = await east.xrange(stream)  # type: ignore[assignment]
        valid, _dead, _lost = parse_batch(entries, Limits())
        events, folded = conflate(valid)
        assert ([e.id for e in events], folded) == ([first.decode()], 1)  # as the apply has it
        await sender._take(FedBatch(StreamId(0, 0), StreamId.parse(later), entries, events))

        sent = [
            (event.id, event.op)
            for _, fields in await stream_entries(west, names.mirror("us-east"))
            if isinstance(envelope := decode_envelope(fields[b"d"]), Batch)
            for event in envelope.events
        ]
        assert sent == [(first.decode(), "unlink"), (later.decode(), "expire")]


@pytest.mark.anyio
async def test_trim_waits_for_every_group(configs: dict[str, RegionConfig]) -> None:
    """While a peer's group is missing (being recreated after the stream was lost), the groups
    that exist must not decide what is trimmed: the missing one still needs every entry."""
    stream = configs["us-east"].streams.local
    needed = [APPLY_GROUP, forward_group("eu-west")]
    async with clients(configs) as redis_by_region:
        east = redis_by_region["us-east"]
        for start in range(0, 1000, 250):
            async with east.pipeline(transaction=False) as pipe:
                for i in range(start, start + 250):
                    pipe.xadd(stream, entry_fields([f"k{i}"]))  # type: ignore[arg-type]
                await pipe.execute()
        await east.xgroup_create(stream, APPLY_GROUP, id="$")  # has read and acked everything

        await trim_stream(east, stream, max_len=100_000, groups_needed=needed)
        assert await east.xlen(stream) == 1000

        await east.xgroup_create(stream, forward_group("eu-west"), id="$")
        await trim_stream(east, stream, max_len=100_000, groups_needed=needed)
        assert await east.xlen(stream) < 1000


@pytest.mark.anyio
async def test_receiver_restart_loses_nothing_and_records_no_gap(
    session_servers: list[RedisServer], namespace: str
) -> None:
    configs = make_configs(urls_of(session_servers), namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    before = [f"{namespace}:before:{i}" for i in range(30)]
    during = [f"{namespace}:during:{i}" for i in range(30)]
    async with clients(configs) as redis_by_region, running(configs, "us-east", "ap-south"):
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(before + during, "cached"))
        async with running(configs, "eu-west"):
            for key in before:
                await east.xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]
            await wait_gone(west, before, region="eu-west")
        for key in during:  # eu-west's gateway is down: delivered to its mirror, not applied
            await east.xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]
        async with running(configs, "eu-west"):
            for region, client in redis_by_region.items():
                await wait_gone(client, during, region=region)
        for client in redis_by_region.values():
            assert await client.xlen(names.gaps) == 0
