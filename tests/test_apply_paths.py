"""Every way an applier can take effect: in the stream's Redis (one transaction with the
acknowledgement), in a cache that is another Redis, and in batches too large for one UNLINK."""

from __future__ import annotations

from functools import partial

import msgspec
import pytest
import redis.asyncio

from invalgw.cache import UNLINK_CHUNK
from invalgw.config import CacheEndpoint, RegionConfig
from invalgw.connections import close
from invalgw.lag import LinkStatus, status_decoder
from invalgw.names import Names
from invalgw.producer import Invalidator
from tests.conftest import REGIONS, clients, make_configs, running, wait_gone, wait_until
from tests.servers import RedisServer, no_retry

pytestmark = pytest.mark.anyio


async def test_a_cache_in_another_database_is_invalidated_everywhere(
    session_servers: list[RedisServer], namespace: str
) -> None:
    urls = {region: server.url for region, server in zip(REGIONS, session_servers, strict=True)}
    configs = make_configs(urls, namespace)
    configs = {
        region: _with_cache(config, urls[region].rsplit("/", 1)[0] + "/1")
        for region, config in configs.items()
    }
    keys = [f"{namespace}:user:{n}" for n in range(20)]
    caches = {
        region: redis.asyncio.Redis.from_url(
            config.cache_endpoint.url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
        )
        for region, config in configs.items()
    }
    try:
        async with clients(configs) as streams, running(configs):
            for cache in caches.values():
                await cache.mset(dict.fromkeys(keys, "cached"))
            invalidator = Invalidator(streams["us-east"], stream=configs["us-east"].streams.local)
            for n in range(0, len(keys), 2):
                await invalidator.invalidate(keys[n], keys[n + 1])
            for region, cache in caches.items():
                await wait_gone(cache, keys, region=region)

            async def acknowledged() -> bool:
                groups = await streams["us-east"].xinfo_groups(configs["us-east"].streams.local)
                return all(group["pending"] == 0 and group["lag"] == 0 for group in groups)

            await wait_until(acknowledged, what="every group to acknowledge")
    finally:
        for cache in caches.values():
            await close(cache)


def _with_cache(config: RegionConfig, url: str) -> RegionConfig:
    return msgspec.structs.replace(config, cache=CacheEndpoint(url=url))


async def test_a_batch_of_more_keys_than_one_unlink_takes_is_applied_everywhere(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    keys = [f"{namespace}:item:{n}" for n in range(2 * UNLINK_CHUNK + 10)]
    per_entry = len(keys) // 3  # within the producer contract's limit of keys per entry
    async with clients(configs) as by_region:
        for client in by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        invalidator = Invalidator(by_region["us-east"], stream=configs["us-east"].streams.local)
        for start in range(0, len(keys), per_entry):  # written before the gateways start,
            await invalidator.invalidate(*keys[start : start + per_entry])  # so: one batch
        async with running(configs):
            for region, client in by_region.items():
                await wait_gone(client, keys, region=region)


async def test_the_status_saved_with_an_acknowledgement_counts_that_batch(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    """``invalgw lag`` reads ``applied`` from the status each batch saves as it is acknowledged:
    the batch's own invalidations are in it, not only in the next periodic save."""
    key = f"{namespace}:profile"
    status_key = Names(configs["us-east"].streams.namespace, "").status
    async with clients(configs) as by_region, running(configs):
        for client in by_region.values():
            await client.set(key, "cached")
        invalidator = Invalidator(by_region["us-east"], stream=configs["us-east"].streams.local)
        entry_id = await invalidator.invalidate(key)

        seen: dict[str, LinkStatus] = {}

        async def saved_with_the_entry(region: str) -> bool:
            raw = await by_region[region].hget(status_key, "us-east")
            if raw is not None:
                seen[region] = status_decoder.decode(raw)
            return raw is not None and seen[region].last_id == entry_id

        for region in configs:
            await wait_until(
                partial(saved_with_the_entry, region), interval=0.005, what=f"{region}'s status"
            )
            assert seen[region].applied >= 1, f"{region} saved {entry_id} with applied=0"
