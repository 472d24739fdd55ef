"""Lag is measured on the Redis servers' clocks, corrected by their measured offset.

The test makes us-east's Redis clock run 30 s behind, as every client sees it: its stream IDs
(written with explicit millisecond parts) and its TIME replies. A naive lag (the receiver's clock
minus the ID's time) would say 30 s; the gateway must still report the real lag, well under 1 s.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from invalgw.config import RedisEndpoint, RegionConfig
from invalgw.connections import AsyncRedis, connect
from invalgw.lag import status_decoder
from invalgw.mirror import SENT_AHEAD_MS
from invalgw.names import Names
from invalgw.proto import Heartbeat, StreamId, encode_envelope
from invalgw.proto.envelope import ENVELOPE_FIELD
from invalgw.service import Gateway
from tests.conftest import clients, running, wait_gone, wait_until

pytestmark = pytest.mark.anyio

SKEW_MS = -30_000


def skewed_clock(url: str) -> Any:
    """A connector whose clients see the Redis at ``url`` with its clock ``SKEW_MS`` off."""

    def connector(endpoint: RedisEndpoint, *, name: str) -> AsyncRedis:
        client = connect(endpoint, name=name)
        if endpoint.url == url:
            real_time = client.time

            async def time_off() -> tuple[int, int]:
                seconds, micros = await real_time()
                total = seconds * 1_000_000 + micros + SKEW_MS * 1000
                return total // 1_000_000, total % 1_000_000

            client.time = time_off  # type: ignore[method-assign,assignment]
        return client

    return connector


async def test_lag_stays_right_when_the_origin_clock_is_off(
    configs: dict[str, RegionConfig], namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin_url = configs["us-east"].redis.url
    real_init = Gateway.__init__

    def init(self: Gateway, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs, connector=skewed_clock(origin_url))

    monkeypatch.setattr(Gateway, "__init__", init)
    keys = [f"{namespace}:k:{i}" for i in range(50)]
    stream = configs["us-east"].streams.local
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "v"))
        for i, key in enumerate(keys):  # IDs on the skewed clock, as its Redis would stamp them
            stamp = int(time.time() * 1000) + SKEW_MS
            await redis_by_region["us-east"].xadd(
                stream, {"op": "unlink", "keys": key}, id=f"{stamp}-{i}"
            )
        for region, client in redis_by_region.items():
            await wait_gone(client, keys, region=region)

        seconds, _ = await redis_by_region["eu-west"].time()
        naive_lag_s = seconds - (int(time.time() * 1000) + SKEW_MS) / 1000
        assert naive_lag_s > 25  # the skew is real: a receiver's own clock would say ~30 s

        for region in ("eu-west", "ap-south", "us-east"):
            registry = gateways[region].metrics.registry
            labels = {"origin": "us-east", "region": region}

            def sample(suffix: str, registry: Any = registry, labels: Any = labels) -> float:
                name = f"invalgw_replication_lag_seconds_{suffix}"
                return float(registry.get_sample_value(name, labels) or 0)

            async def observed(sample: Any = sample) -> bool:
                return bool(sample("count") >= len(keys))

            await wait_until(observed, what=f"{region} to observe the lag of every invalidation")
            mean = sample("sum") / sample("count")
            assert mean < 1.0, f"{region}: mean lag {mean:.3f}s"


async def test_a_heartbeat_sent_from_the_future_cannot_hide_a_silent_link(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    """A peer (forged, or its clock broken) sends a heartbeat a day ahead. Kept as sent, the
    link's heartbeat age would read 0 for a day, however long the link then stays silent; it
    counts as at most :data:`SENT_AHEAD_MS` past the origin's clock."""
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    mirror = names.mirror("us-east")
    async with clients(configs) as by_region, running(configs):
        east, west = by_region["us-east"], by_region["eu-west"]

        async def linked() -> bool:
            return await west.hget(names.status, "us-east") is not None

        await wait_until(linked, what="eu-west's status of us-east")
        raw: Any = await west.hget(names.status, "us-east")
        status = status_decoder.decode(raw)
        epoch: Any = await east.get(names.epoch)
        forged = Heartbeat(
            origin="us-east",
            epoch=epoch.decode(),
            last=status.last_id,
            sent_ms=int(time.time() * 1000) + 86_400_000,
        )
        forged_id: Any = await west.xadd(mirror, {ENVELOPE_FIELD: encode_envelope(forged)})

        async def applied() -> bool:
            [group] = [g for g in await west.xinfo_groups(mirror) if g["name"] == b"apply"]
            delivered = StreamId.parse(group["last-delivered-id"])
            return delivered >= StreamId.parse(forged_id) and group["pending"] == 0

        await wait_until(applied, what="the forged heartbeat applied in eu-west")
        raw = await west.hget(names.status, "us-east")
        status = status_decoder.decode(raw)
        assert status.heartbeat_ms <= time.time() * 1000 + SENT_AHEAD_MS
