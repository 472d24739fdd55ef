"""Both ways an applier can take effect: in the stream's Redis (one transaction with the
acknowledgement), and in a cache that is another Redis (unlink there first)."""

from __future__ import annotations

import msgspec
import pytest
import redis.asyncio

from gateway.config import RedisEndpoint, RegionConfig
from gateway.producer import Invalidator
from tests.conftest import REGIONS, clients, make_configs, running, wait_gone, wait_until
from tests.servers import RedisServer

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
            config.cache_endpoint.url, socket_timeout=5, socket_connect_timeout=2
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
            await cache.aclose()


def _with_cache(config: RegionConfig, url: str) -> RegionConfig:
    return msgspec.structs.replace(config, cache=RedisEndpoint(url=url))
