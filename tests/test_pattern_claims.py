"""A pattern walk that outlasts claim_idle_ms is not taken for a dead consumer's entry.

Its stream entry stays pending on purpose until the walk ends; the periodic XAUTOCLAIM must not
hand it out again (re-applying it, counting it twice, reporting "took over" entries).
"""

from __future__ import annotations

import pytest

from invalgw.config import RegionConfig
from tests.conftest import clients, make_configs, metric, running, wait_until
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio

KEYS = 150_000


async def test_a_long_walk_is_counted_once_and_never_reclaimed(
    session_servers: list[RedisServer], namespace: str
) -> None:
    urls = {"us-east": session_servers[0].url}
    configs: dict[str, RegionConfig] = make_configs(
        urls, namespace, gateway={"claim_idle_ms": 50, "claim_interval_ms": 50}
    )
    stream = configs["us-east"].streams.local
    async with clients(configs) as redis_by_region:
        east = redis_by_region["us-east"]
        for start in range(0, KEYS, 5000):
            await east.mset({f"{namespace}:walk:{i}": "v" for i in range(start, start + 5000)})
        async with running(configs) as gateways:
            gateway = gateways["us-east"]
            await east.xadd(stream, {"op": "unlink", "pattern": f"{namespace}:walk:*"})

            async def walked() -> bool:
                done = metric(
                    gateway,
                    "invalgw_pattern_invalidations_total",
                    region="us-east",
                    origin="us-east",
                )
                return done >= 1

            await wait_until(walked, seconds=30, what="the walk to finish")
            applied = metric(
                gateway,
                "invalgw_invalidations_applied_total",
                region="us-east",
                origin="us-east",
                op="unlink",
            )
            reclaimed = metric(
                gateway, "invalgw_entries_reclaimed_total", region="us-east", group="apply"
            )
            assert applied == 1
            assert reclaimed == 0
            left = [key async for key in east.scan_iter(match=f"{namespace}:walk:*", count=1000)]
            assert left == []
