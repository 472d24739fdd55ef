"""Conflation: a key invalidated several times in one batch is applied and sent once, with the
strongest effect and the highest version; other keys keep their order."""

from __future__ import annotations

import pytest

from invalgw.config import RegionConfig
from invalgw.conflate import conflate
from invalgw.names import Names
from invalgw.proto import Batch, Invalidation, decode_envelope, entry_fields
from tests.conftest import clients, metric, running, stream_entries, wait_until


def event(n: int, op: str, *keys: str, version: str | None = None) -> Invalidation:
    return Invalidation(id=f"1-{n}", op=op, keys=list(keys), version=version)  # type: ignore[arg-type]


def test_a_repeated_key_is_kept_once_with_the_strongest_effect() -> None:
    events = [
        event(1, "expire", "a", "b"),
        event(2, "unlink", "a"),
        event(3, "expire", "c", "a"),
    ]
    kept, saved = conflate(events)
    assert [(e.id, e.op, e.keys) for e in kept] == [
        ("1-1", "expire", ["b"]),
        ("1-2", "unlink", ["a"]),
        ("1-3", "expire", ["c"]),
    ]
    assert saved == 2


def test_hybrid_wins_over_expire_and_the_latest_of_equals_stays() -> None:
    kept, saved = conflate(
        [
            event(1, "hybrid", "a"),
            event(2, "expire", "a"),
            event(3, "unlink", "b"),
            event(4, "hybrid", "a"),
        ]
    )
    assert [(e.id, e.keys) for e in kept] == [("1-3", ["b"]), ("1-4", ["a"])]
    assert saved == 2


def test_the_highest_version_stays_and_mixed_cases_are_left_alone() -> None:
    versioned = [event(1, "unlink", "a", version="7"), event(2, "unlink", "a", version="12")]
    kept, saved = conflate(versioned)
    assert [(e.id, e.version) for e in kept] == [("1-2", "12")]
    assert saved == 1
    # unlink at version 3, expire at version 9: no single occurrence has both
    split = [event(1, "unlink", "a", version="3"), event(2, "expire", "a", version="9")]
    assert conflate(split) == (split, 0)
    # the policy decides what invalidate does in each region: not comparable with expire
    policy = [event(1, "invalidate", "a"), event(2, "expire", "a")]
    assert conflate(policy) == (policy, 0)
    unique = [event(1, "unlink", "a", "b"), event(2, "expire", "c")]
    assert conflate(unique) == (unique, 0)


@pytest.mark.anyio
async def test_a_batch_applies_and_sends_each_key_once(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    keys = {name: f"{namespace}:{name}" for name in ("a", "b", "c")}
    async with clients(configs) as redis_by_region:
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys.values(), "cached"))
        # written before the gateway starts: read as one batch
        for op, written in (("expire", "a b"), ("unlink", "a"), ("unlink", "c a"), ("expire", "a")):
            fields = entry_fields([keys[k] for k in written.split()], op=op)  # type: ignore[arg-type]
            await east.xadd(names.local_stream, fields)  # type: ignore[arg-type]
        async with running(configs) as gateways:

            async def gone() -> bool:
                return not await east.exists(keys["a"]) and not await west.exists(keys["a"])

            await wait_until(gone, what="a to be gone in us-east and eu-west")

            async def sent() -> list[Invalidation]:
                return [
                    e
                    for _, fields in await stream_entries(west, names.mirror("us-east"))
                    if isinstance(batch := decode_envelope(fields[b"d"]), Batch)
                    for e in batch.events
                ]

            async def delivered() -> bool:
                return len(await sent()) == 2

            await wait_until(delivered, what="the batch in eu-west's mirror")
            assert [(e.op, e.keys) for e in await sent()] == [
                ("expire", [keys["b"]]),
                ("unlink", [keys["c"], keys["a"]]),
            ]
            assert metric(gateways["us-east"], "invalgw_conflated_total", region="us-east") == 3
            assert metric(gateways["eu-west"], "invalgw_conflated_total", region="eu-west") == 0
