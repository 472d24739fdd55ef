"""A sender that fails on the entries it read (not on Redis) does not stop the gateway.

One sender's preparation of an envelope is made to fail on one key (our own code patched, for
that sender only; Redis is real). The local apply and the other peer's sender go on at once; the
failing sender tries again, then entry by entry, and dead-letters the entry it keeps failing on,
telling its peer of a gap; a failure that passes is only retried.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from invalgw.feed import FedBatch
from invalgw.names import Names
from invalgw.poison import MAX_ATTEMPTS
from invalgw.proto import Invalidation, StreamId, entry_fields
from invalgw.window import Outgoing
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
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio


class FailOn:
    """Stands in for one sender's ``_envelope``: raises on any batch holding ``key`` (at most
    ``times`` times), else does what it did."""

    def __init__(self, real: Any, key: str, times: int | None = None) -> None:
        self.real = real
        self.key = key
        self.times = times
        self.batches: Counter[int] = Counter()
        """Failures, by the number of events in the batch."""

    def __call__(
        self,
        out: Outgoing,
        valid: Sequence[Invalidation],
        gap: tuple[str, str] | None,
        encoded: FedBatch | None,
    ) -> None:
        holds = any(self.key in event.keys for event in valid)
        if holds and (self.times is None or self.times > sum(self.batches.values())):
            self.batches[len(valid)] += 1
            raise ValueError(f"cannot encode {self.key}")
        self.real(out, valid, gap, encoded)


async def write(client: Any, stream: str, keys: list[str]) -> list[bytes]:
    """One entry per key, in one round trip (so the gateway reads them as one batch)."""
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.xadd(stream, entry_fields([key]))
        ids: list[bytes] = await pipe.execute()
    return ids


async def test_an_entry_one_sender_keeps_failing_on_is_dead_lettered_and_the_peer_told(
    session_servers: list[RedisServer], namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = {region: server.url for region, server in zip(REGIONS, session_servers, strict=True)}
    configs = make_configs(urls, namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    keys = [f"{namespace}:{name}" for name in ("a", "b", "poison", "c", "d")]
    poison = keys[2]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        sender = gateways["us-east"].forwarders["eu-west"]
        fail = FailOn(sender._envelope, poison)
        monkeypatch.setattr(sender, "_envelope", fail)
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))

        ids = await write(east, names.local_stream, keys)

        # the local apply and the other peer are not held up by eu-west's sender
        await wait_gone(east, keys, region="us-east")
        await wait_gone(redis_by_region["ap-south"], keys, region="ap-south")
        # eu-west gets every other entry, and a gap for the one its sender gave up on
        others = [key for key in keys if key != poison]
        await wait_gone(west, others, region="eu-west")
        assert await west.get(poison) == b"cached"
        [(_, letter)] = await stream_entries(east, names.dead_letters)
        assert letter[b"dead.id"] == ids[2]
        assert letter[b"dead.stream"] == names.local_stream.encode()
        reason = letter[b"dead.reason"]
        assert reason.startswith(b"to:eu-west failed 3 times on this entry: ValueError"), reason
        assert {k: v for k, v in letter.items() if not k.startswith(b"dead.")} == {
            k.encode(): v.encode() for k, v in entry_fields([poison]).items()
        }
        dead = metric(
            gateways["us-east"],
            "invalgw_dead_letters_total",
            region="us-east",
            reason="handler_failed",
        )
        assert dead == 1
        # tried in its batch, then alone: MAX_ATTEMPTS times each, no more
        assert fail.batches[1] >= MAX_ATTEMPTS
        assert sum(fail.batches.values()) <= 2 * MAX_ATTEMPTS

        async def gap_recorded() -> bool:
            return any(
                fields[b"origin"] == b"us-east"
                for _, fields in await stream_entries(west, names.gaps)
            )

        await wait_until(gap_recorded, what="eu-west to record a gap for the entry dead-lettered")
        [gap] = [f for _, f in await stream_entries(west, names.gaps) if f[b"origin"] == b"us-east"]
        after, upto = StreamId.parse(gap[b"after"]), StreamId.parse(gap[b"upto"])
        assert after < StreamId.parse(ids[2]) <= upto
        assert StreamId.parse(ids[1]) <= after, "the gap holds nothing eu-west was sent"
        assert upto < StreamId.parse(ids[3])

        # the sender goes on: a later invalidation reaches eu-west as usual
        later = f"{namespace}:later"
        await west.set(later, "cached")
        await write(east, names.local_stream, [later])
        await wait_gone(west, [later], region="eu-west")
        assert sum(fail.batches.values()) <= 2 * MAX_ATTEMPTS
        for region in ("us-east", "ap-south"):
            assert await redis_by_region[region].xlen(names.gaps) == 0


async def test_a_failure_that_passes_is_only_retried(
    session_servers: list[RedisServer], namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = {region: server.url for region, server in zip(REGIONS, session_servers, strict=True)}
    configs = make_configs(urls, namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    keys = [f"{namespace}:{name}" for name in ("a", "flaky", "b")]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        sender = gateways["us-east"].forwarders["eu-west"]
        fail = FailOn(sender._envelope, keys[1], times=MAX_ATTEMPTS - 1)
        monkeypatch.setattr(sender, "_envelope", fail)
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))

        await write(east, names.local_stream, keys)

        for region, client in redis_by_region.items():
            await wait_gone(client, keys, region=region)
        assert sum(fail.batches.values()) == MAX_ATTEMPTS - 1
        assert await east.xlen(names.dead_letters) == 0
        assert await west.xlen(names.gaps) == 0
