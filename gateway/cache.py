"""The region's cache: where invalidations take effect."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.connections import AsyncRedis

UNLINK_CHUNK = 1000
"""Keys per UNLINK: large enough to amortise the round trip, small enough not to stall Redis."""


class Cache:
    """Removes keys from one region's cache with UNLINK (memory is freed in the background).

    ``in_stream_redis``: the cache is the Redis that holds the gateway's streams (the default
    set-up), so an applier can unlink and acknowledge in one transaction (:func:`queue_unlink`).
    """

    def __init__(self, client: AsyncRedis, *, in_stream_redis: bool = False) -> None:
        self.client = client
        self.in_stream_redis = in_stream_redis

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


def queue_unlink(pipe: Any, keys: Sequence[str]) -> int:
    """Queue UNLINKs of ``keys`` on a pipeline; returns how many commands (replies) that is."""
    for start in range(0, len(keys), UNLINK_CHUNK):
        pipe.unlink(*keys[start : start + UNLINK_CHUNK])
    return (len(keys) + UNLINK_CHUNK - 1) // UNLINK_CHUNK
