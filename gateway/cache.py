"""The region's cache: where invalidations take effect.

A standalone Redis takes a batch's effects in one pipeline. A Redis Cluster takes them grouped by
hash slot, so every multi-key UNLINK stays inside one slot, in one pipeline per node. Pattern
invalidations walk the keyspace with SCAN (never KEYS), on every primary of a cluster, in bounded
batches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from gateway.effects import Plan
from gateway.fence import APPLY_SCRIPT as FENCE_SCRIPT
from gateway.fence import fence_key, hash_tag

UNLINK_CHUNK = 1000
"""Keys per UNLINK: large enough to amortise the round trip, small enough not to stall Redis."""

CacheClient = redis.asyncio.Redis | RedisCluster


class Cache:
    """Applies effects to one region's cache (a standalone Redis or a Redis Cluster)."""

    def __init__(self, client: CacheClient, *, fence_ttl_ms: int = 60_000) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.fence_ttl_ms = fence_ttl_ms

    async def unlink(self, keys: Sequence[str]) -> int:
        """Remove ``keys``; returns how many existed. Idempotent, so redelivery is harmless."""
        return await self.apply(Plan(unlink=list(keys)))

    async def apply(self, plan: Plan) -> int:
        """Carry out ``plan`` (one round trip per node); returns how many keys were removed."""
        if not plan:
            return 0
        only_unlink = not plan.expire and not plan.fenced and len(plan.unlink) <= UNLINK_CHUNK
        if only_unlink and not self.cluster:
            return int(await self.client.unlink(*plan.unlink))
        removed = 0
        async with self.client.pipeline(transaction=False) as pipe:
            counted = self._queue(pipe, plan)
            results = await pipe.execute()
        for result, count in zip(results, counted, strict=True):
            if count:
                removed += int(result)
        return removed

    def _queue(self, pipe: Any, plan: Plan) -> list[bool]:
        """Queue the plan's commands; returns, per command, whether its reply counts removals."""
        counted: list[bool] = []
        for group in self._unlink_groups(plan.unlink):
            pipe.execute_command("UNLINK", *group)
            counted.append(True)
        for key, ttl in plan.expire:
            pipe.execute_command("PEXPIRE", key, ttl, "LT")
            counted.append(False)
        for key, version, ttl in plan.fenced:
            pipe.execute_command(
                "EVAL", FENCE_SCRIPT, 2, key, fence_key(key), version, self.fence_ttl_ms, ttl
            )
            counted.append(True)
        return counted

    def _unlink_groups(self, keys: list[str]) -> list[list[str]]:
        if not self.cluster:
            return [keys[i : i + UNLINK_CHUNK] for i in range(0, len(keys), UNLINK_CHUNK)]
        by_slot: dict[int, list[str]] = defaultdict(list)
        for key in keys:
            by_slot[key_slot(key.encode())].append(key)
        return [
            group[i : i + UNLINK_CHUNK]
            for group in by_slot.values()
            for i in range(0, len(group), UNLINK_CHUNK)
        ]

    async def scan(self, pattern: str, *, count: int = 1000) -> AsyncIterator[list[str]]:
        """Batches of keys matching ``pattern``, from every primary (SCAN, never KEYS).

        A pattern that starts with a hash tag (``{user:1001}:*``) is looked for only on the node
        that owns that tag's slot.
        """
        if not isinstance(self.client, RedisCluster):
            async for batch in _scan_node(self.client.execute_command, pattern, count):
                yield batch
            return
        await self.client.initialize()  # a fresh client knows no nodes yet: it would walk none
        nodes = self.client.get_primaries()
        if pattern.startswith("{") and "}" in pattern[2:]:
            tag = hash_tag(pattern)
            owner = self.client.get_node_from_key(pattern)
            if owner is not None and not any(c in tag for c in "*?[\\"):
                nodes = [owner]
        for node in nodes:
            async for batch in _scan_node(node.execute_command, pattern, count):
                yield batch


async def _scan_node(execute: Any, pattern: str, count: int) -> AsyncIterator[list[str]]:
    cursor: int | bytes = 0
    while True:
        cursor, keys = await execute("SCAN", cursor, "MATCH", pattern, "COUNT", count)
        if keys:
            yield [key.decode() if isinstance(key, bytes) else key for key in keys]
        if int(cursor) == 0:
            return
