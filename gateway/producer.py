"""The Python producer helper: invalidate keys with one XADD, as any service would.

::

    from invalgw.producer import Invalidator

    invalidator = Invalidator(redis_client)              # redis.asyncio.Redis
    await invalidator.invalidate("user:1001:profile", "user:1001:permissions")

    # read-your-writes: also UNLINK here, in the same round trip
    await invalidator.invalidate("user:1001:profile", unlink_local=True)

    # a region whose stream has 8 partitions ([streams] partitions = 8): the entry goes to the
    # partition of its first key (or of its pattern), see invalgw.proto.partition_of
    invalidator = Invalidator(redis_client, partitions=8)

:class:`SyncInvalidator` does the same with a blocking ``redis.Redis``. Both write exactly the
fields of the public contract (see ``proto/README.md``), so what they write is what
``redis-cli XADD`` would write.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio

from invalgw.proto import MAX_PARTITIONS, entry_fields, stream_for
from invalgw.proto.entry import Op

DEFAULT_STREAM = "invalidations"


def _checked(partitions: int) -> int:
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be between 1 and {MAX_PARTITIONS}, not {partitions}")
    return partitions


def _entry_id(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


class Invalidator:
    """Writes invalidations into a region's stream with a ``redis.asyncio.Redis`` client (or a
    ``redis.asyncio.RedisCluster`` one, for a stream Redis that is a cluster)."""

    def __init__(
        self,
        client: redis.asyncio.Redis | redis.asyncio.RedisCluster,
        *,
        stream: str = DEFAULT_STREAM,
        source: str | None = None,
        partitions: int = 1,
    ) -> None:
        self.client = client
        self.stream = stream
        """The region's stream (``[streams] local``); with partitions, the name they share."""
        self.source = source
        self.partitions = _checked(partitions)
        """The region's ``[streams] partitions``: each entry goes to the partition of its
        first key (or pattern)."""

    async def invalidate(
        self,
        *keys: str,
        unlink_local: bool = False,
        traceparent: str | None = None,
        op: Op = "unlink",
        pattern: str | None = None,
        version: int | str | None = None,
    ) -> str:
        """Invalidate ``keys`` (or every key matching ``pattern``) in every region with ``op``;
        returns the stream entry ID. ``version`` fences slower fills (see ``invalgw.fence``).

        With ``unlink_local=True`` the keys are also removed from this region's Redis in the
        same round trip, so the caller's next read already misses (on a cluster: first, then
        the XADD, as the keys and the stream live in other slots).
        """
        fields = entry_fields(
            keys,
            op=op,
            pattern=pattern,
            version=version,
            traceparent=traceparent,
            source=self.source,
        )
        stream = stream_for(self.stream, self.partitions, keys, pattern)
        if not unlink_local or not keys:
            return _entry_id(await self.client.xadd(stream, fields))  # type: ignore[arg-type]
        if isinstance(self.client, redis.asyncio.RedisCluster):  # keys and stream: other slots
            await self.client.unlink(*keys)
            return _entry_id(await self.client.xadd(stream, fields))  # type: ignore[arg-type]
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.unlink(*keys)
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
            _removed, entry_id = await pipe.execute()
        return _entry_id(entry_id)


class SyncInvalidator:
    """Writes invalidations into a region's stream with a blocking ``redis.Redis`` client."""

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster,
        *,
        stream: str = DEFAULT_STREAM,
        source: str | None = None,
        partitions: int = 1,
    ) -> None:
        self.client = client
        self.stream = stream
        self.source = source
        self.partitions = _checked(partitions)

    def invalidate(
        self,
        *keys: str,
        unlink_local: bool = False,
        traceparent: str | None = None,
        op: Op = "unlink",
        pattern: str | None = None,
        version: int | str | None = None,
    ) -> str:
        """See :meth:`Invalidator.invalidate`."""
        fields = entry_fields(
            keys,
            op=op,
            pattern=pattern,
            version=version,
            traceparent=traceparent,
            source=self.source,
        )
        stream = stream_for(self.stream, self.partitions, keys, pattern)
        if not unlink_local or not keys:
            return _entry_id(self.client.xadd(stream, fields))  # type: ignore[arg-type]
        if isinstance(self.client, redis.RedisCluster):  # keys and stream: other slots
            self.client.unlink(*keys)
            return _entry_id(self.client.xadd(stream, fields))  # type: ignore[arg-type]
        with self.client.pipeline(transaction=True) as pipe:
            pipe.unlink(*keys)
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
            _removed, entry_id = pipe.execute()
        return _entry_id(entry_id)
