"""Partition leases on a real Redis: fair shares, one owner per partition at every moment, a
dead holder's partitions taken after the TTL, a handover on request, a release at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import pytest
import redis.asyncio

from invalgw.connections import close
from invalgw.names import Names
from invalgw.partlease import Lease, PartitionLeases
from tests.servers import RedisServer, no_retry

pytestmark = pytest.mark.anyio

P = 8
TTL_MS = 600


@pytest.fixture
async def client(session_servers: list[RedisServer]) -> AsyncIterator[redis.asyncio.Redis]:
    made = redis.asyncio.Redis.from_url(
        session_servers[0].url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
    )
    yield made
    await close(made)


def process(client: redis.asyncio.Redis, namespace: str, consumer: str) -> PartitionLeases:
    names = Names(namespace, f"{namespace}:inval")
    leases = [
        Lease(p, names.partition(p, P).lease, names.partition(p, P).handover, client)
        for p in range(P)
    ]
    return PartitionLeases(leases, consumer, ttl_ms=TTL_MS)


async def rounds(
    members: list[PartitionLeases], until: Callable[[], bool], seconds: float = 10
) -> None:
    """Run rounds of every member (releasing what each hands over, as the gateway does once
    the partition stopped), checking that no partition ever has two holders."""
    with anyio.fail_after(seconds):
        while True:
            for member in members:
                decided = await member.round()
                for p in decided.stop:
                    if p in member.handing_over:
                        await member.release(p)
                held = [p for each in members for p in each.held]
                assert len(held) == len(set(held)), "a partition with two holders"
            if until():
                return
            await anyio.sleep(TTL_MS / 3000)


def shares(members: list[PartitionLeases]) -> list[int]:
    return sorted(len(member.held) for member in members)


async def test_fair_shares_dead_holder_join_and_release(
    client: redis.asyncio.Redis, namespace: str
) -> None:
    a, b, c = (process(client, namespace, name) for name in "abc")
    await rounds([a, b, c], lambda: shares([a, b, c]) == [2, 3, 3])

    dead = set(b.held)  # b stops renewing: its leases expire after the TTL
    await rounds([a, c], lambda: shares([a, c]) == [4, 4])
    assert dead <= a.held | c.held

    d = process(client, namespace, "d")  # joins: asks for partitions, one per round
    await rounds([a, c, d], lambda: shares([a, c, d]) == [2, 3, 3])

    for p in list(a.held):  # a drains: releases at once, the others take them next round
        await a.release(p)
    await rounds([c, d], lambda: shares([c, d]) == [4, 4], seconds=TTL_MS / 1000)


async def test_a_node_that_does_not_answer_costs_only_its_own_partitions(
    client: redis.asyncio.Redis, namespace: str
) -> None:
    """On a cluster each lease lives on its partition's node: one node down must not stop the
    renewal of the others (a round that gave up at the first error lost every lease)."""
    dead = redis.asyncio.Redis(
        port=1, socket_timeout=1, socket_connect_timeout=0.5, retry=no_retry()
    )  # nothing listens on port 1
    member = process(client, namespace, "a")
    member.leases[3].client = dead
    decided = await member.round()
    assert sorted(decided.start) == [0, 1, 2, 4, 5, 6, 7]
    assert len(decided.failed) == 1
    decided = await member.round()  # the renewals go on
    assert decided.stop == []
    assert member.held == {0, 1, 2, 4, 5, 6, 7}
    await close(dead)
