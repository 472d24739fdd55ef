"""The region's cache: where invalidations take effect.

A batch's unlinks and soft expiries go to each node in one script call per thousand keys: the
cost is per batch, not per key (a pipeline of one command per key spends most of its time in the
client; on a cluster, one command per hash slot is about one per key). On a cluster the script
runs on the node that serves the keys, which may be in many slots; if one is not served there
any more (its slot moved, or is being migrated), that node's part is redone key by key through
the cluster client, which follows the redirections. Versioned (fenced) effects go key by key,
each in its own slot. Pattern invalidations walk the keyspace with SCAN (never KEYS), on every
primary of a cluster, in bounded batches.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster

from invalgw.effects import Key, Plan
from invalgw.fence import APPLY_SCRIPT as FENCE_SCRIPT
from invalgw.fence import fence_key, hash_tag

log = logging.getLogger(__name__)

UNLINK_CHUNK = 1000
"""Keys per UNLINK or script call: large enough to amortise the round trip, small enough not to
stall Redis (about a millisecond)."""

BULK_SCRIPT = """#!lua flags=allow-cross-slot-keys,allow-oom
-- ARGV[1] n, ARGV[2..n+1] keys to unlink, then (key, ttl ms) pairs to expire softly (PEXPIRE LT).
-- Undeclared keys: on a cluster node they span slots, all served by this node; a key that is
-- not fails the script (the caller redoes it key by key). allow-oom: a full cache must still
-- accept invalidations, which only free memory.
local n = tonumber(ARGV[1])
local removed = 0
for i = 2, n + 1 do
  removed = removed + redis.call('UNLINK', ARGV[i])
end
for i = n + 2, #ARGV, 2 do
  redis.call('PEXPIRE', ARGV[i], ARGV[i + 1], 'LT')
end
return removed
"""

CacheClient = redis.asyncio.Redis | RedisCluster


class Cache:
    """Applies effects to one region's cache (a standalone Redis or a Redis Cluster).

    ``in_stream_redis``: the cache is the Redis that holds the gateway's streams (the default
    set-up), so an applier can unlink and acknowledge in one transaction (:func:`queue_unlink`).
    """

    def __init__(
        self, client: CacheClient, *, fence_ttl_ms: int = 60_000, in_stream_redis: bool = False
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.fence_ttl_ms = fence_ttl_ms
        self.in_stream_redis = in_stream_redis
        self._refused = False
        """The cache refused the one-script apply for a reason other than a moved slot."""

    async def unlink(self, keys: Sequence[Key]) -> int:
        """Remove ``keys``; returns how many existed. Idempotent, so redelivery is harmless."""
        return await self.apply(Plan(unlink=list(keys)))

    async def apply(self, plan: Plan) -> int:
        """Carry out ``plan``; returns how many keys were removed."""
        if not plan:
            return 0
        if not self.cluster and not plan.expire and not plan.fenced:
            async with self.client.pipeline(transaction=False) as pipe:
                queue_unlink(pipe, plan.unlink)
                return sum(await pipe.execute())
        removed = 0
        if plan.unlink or plan.expire:
            for node, part in (await self._by_node(plan)).items():
                removed += await self._bulk(node, part)
        if plan.fenced:
            removed += await self._by_slot(Plan(fenced=plan.fenced))
        return removed

    async def _by_node(self, plan: Plan) -> dict[ClusterNode | None, Plan]:
        """The plan's unlinks and expiries split by the node that serves them (None: standalone)."""
        if not isinstance(self.client, RedisCluster):
            return {None: Plan(unlink=plan.unlink, expire=plan.expire)}
        await self.client.initialize()
        parts: dict[ClusterNode | None, Plan] = defaultdict(Plan)
        node_of: Any = self.client.get_node_from_key  # takes bytes too (it hashes the encoding)
        for key in plan.unlink:
            parts[node_of(key)].unlink.append(key)
        for key, ttl in plan.expire:
            parts[node_of(key)].expire.append((key, ttl))
        return parts

    async def _bulk(self, node: ClusterNode | None, part: Plan) -> int:
        """``part`` on one node in script calls; command by command if the node refuses."""
        try:
            if node is None:
                async with self.client.pipeline(transaction=False) as pipe:
                    for args in _bulk_args(part):
                        pipe.execute_command("EVAL", BULK_SCRIPT, 0, *args)
                    return sum(int(removed) for removed in await pipe.execute())
            removed = 0
            for args in _bulk_args(part):
                reply = await self.client.execute_command(
                    "EVAL", BULK_SCRIPT, 0, *args, target_nodes=node
                )
                removed += int(reply)
            return removed
        except redis.ResponseError as exc:
            moved = "non local key" in str(exc)  # a slot moved: expected while resharding
            level = logging.DEBUG if moved or self._refused else logging.WARNING
            log.log(level, "cache refused the one-script apply (%s); applying key by key", exc)
            self._refused = self._refused or not moved
            # keys the script removed before it failed are not counted again
            return await self._by_slot(part)

    async def _by_slot(self, plan: Plan) -> int:
        """Carry out ``plan`` in one pipeline of commands that each touch one slot."""
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

    def _unlink_groups(self, keys: list[Key]) -> list[list[Key]]:
        """Standalone: chunks. Cluster: key by key, since a multi-key UNLINK in a slot that is
        being migrated fails (TRYAGAIN) while its keys are on both nodes."""
        if self.cluster:
            return [[key] for key in keys]
        return [keys[i : i + UNLINK_CHUNK] for i in range(0, len(keys), UNLINK_CHUNK)]

    async def scan(self, pattern: str, *, count: int = 1000) -> AsyncIterator[list[bytes]]:
        """Batches of keys (bytes) matching ``pattern``, from every primary (SCAN, never KEYS).

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


def _bulk_args(part: Plan) -> Iterator[list[Key | int]]:
    """Arguments of the script calls for ``part``, at most UNLINK_CHUNK keys each."""
    for i in range(0, len(part.unlink), UNLINK_CHUNK):
        chunk = part.unlink[i : i + UNLINK_CHUNK]
        yield [len(chunk), *chunk]
    for i in range(0, len(part.expire), UNLINK_CHUNK):
        yield [0, *(item for pair in part.expire[i : i + UNLINK_CHUNK] for item in pair)]


async def _scan_node(execute: Any, pattern: str, count: int) -> AsyncIterator[list[bytes]]:
    """SCAN one node. Keys stay bytes as Redis gives them: a key need not be UTF-8."""
    cursor: int | bytes = 0
    while True:
        cursor, keys = await execute("SCAN", cursor, "MATCH", pattern, "COUNT", count)
        if keys:
            yield list(keys)
        if int(cursor) == 0:
            return


def queue_unlink(pipe: Any, keys: Sequence[Key]) -> int:
    """Queue UNLINKs of ``keys`` on a pipeline; returns how many commands (replies) that is."""
    for start in range(0, len(keys), UNLINK_CHUNK):
        pipe.unlink(*keys[start : start + UNLINK_CHUNK])
    return (len(keys) + UNLINK_CHUNK - 1) // UNLINK_CHUNK
