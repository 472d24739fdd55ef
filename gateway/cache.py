"""The region's cache: where invalidations take effect."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.connections import AsyncRedis

UNLINK_CHUNK = 1000
"""Keys per UNLINK: large enough to amortise the round trip, small enough not to stall Redis."""


class Cache:
    """Removes keys from one region's cache with UNLINK (memory is freed in the background)."""

    def __init__(self, client: AsyncRedis) -> None:
        self.client = client

    async def unlink(self, keys: Sequence[str]) -> int:
        """Remove ``keys``; returns how many existed. Idempotent, so redelivery is harmless."""
        if not keys:
            return 0
        if len(keys) <= UNLINK_CHUNK:
            return int(await self.client.unlink(*keys))
        async with self.client.pipeline(transaction=False) as pipe:
            for start in range(0, len(keys), UNLINK_CHUNK):
                pipe.unlink(*keys[start : start + UNLINK_CHUNK])
            return sum(await pipe.execute())
