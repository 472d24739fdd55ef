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
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster

from invalgw.connections import CONNECTION_ERRORS
from invalgw.effects import Key, Plan
from invalgw.fence import APPLY_SCRIPT as FENCE_SCRIPT
from invalgw.fence import fence_key, hash_tag
from invalgw.metrics import Metrics
from invalgw.proto import WILDCARDS

log = logging.getLogger(__name__)

REDIRECT_LOG_EVERY_S = 10.0
"""Redirections are logged (at INFO) at most this often, with how many keys since the last line."""

UNLINK_CHUNK = 1000
"""Keys per UNLINK or script call: large enough to amortise the round trip, small enough not to
stall Redis (about a millisecond)."""

BULK_SCRIPT = """#!lua flags=allow-cross-slot-keys,allow-oom
-- ARGV[1] n, ARGV[2..n+1] keys to unlink, then (key, ttl ms) pairs to expire softly (PEXPIRE LT).
-- Undeclared keys: on a cluster node they span slots, all served by this node. allow-oom: a
-- full cache must still accept invalidations, which only free memory.
-- Returns {removed, unlinks refused, (key, ttl) pairs refused, how many refusals were ASK}:
-- a key this node does not serve (its slot moved, or is being migrated) is refused, not fatal,
-- so the keys removed are counted once and only the refused ones are redone through the
-- cluster client.
local n = tonumber(ARGV[1])
local removed = 0
local unlinks, expires, asked = {}, {}, 0
local function refused(reply)
  if type(reply) == 'table' and reply.err then
    if string.find(reply.err, 'ASK') or string.find(reply.err, 'TRYAGAIN') then
      asked = asked + 1
    end
    return true
  end
  return false
end
for i = 2, n + 1 do
  local reply = redis.pcall('UNLINK', ARGV[i])
  if refused(reply) then
    unlinks[#unlinks + 1] = ARGV[i]
  else
    removed = removed + reply
  end
end
for i = n + 2, #ARGV, 2 do
  if refused(redis.pcall('PEXPIRE', ARGV[i], ARGV[i + 1], 'LT')) then
    expires[#expires + 1] = ARGV[i]
    expires[#expires + 1] = ARGV[i + 1]
  end
end
return {removed, unlinks, expires, asked}
"""

CacheClient = redis.asyncio.Redis | RedisCluster


class Cache:
    """Applies effects to one region's cache (a standalone Redis or a Redis Cluster).

    ``in_stream_redis``: the cache is the Redis that holds the gateway's streams (the default
    set-up), so an applier can unlink and acknowledge in one call
    (:func:`invalgw.apply.ack_with_status`).
    """

    def __init__(
        self,
        client: CacheClient,
        *,
        fence_ttl_ms: int = 60_000,
        in_stream_redis: bool = False,
        region: str = "",
        metrics: Metrics | None = None,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.fence_ttl_ms = fence_ttl_ms
        self.in_stream_redis = in_stream_redis
        self.down: set[str] = set()
        """Cluster nodes (``host:port``) whose last call failed: tried again only by a retry."""
        self._refused = False
        """The cache refused the one-script apply (scripts not allowed, say): warned once."""
        self._region = region
        self._redirects = metrics.cache_redirects if metrics is not None else None
        if self._redirects is not None:
            for kind in ("moved", "ask"):
                self._redirects.labels(region, kind)
        self._redirect_logged = 0.0
        self._redirects_unlogged = 0

    async def unlink(self, keys: Sequence[Key]) -> int:
        """Remove ``keys``; returns how many existed. Idempotent, so redelivery is harmless."""
        return await self.apply(Plan(unlink=list(keys)))

    async def apply(self, plan: Plan) -> int:
        """Carry out ``plan``; returns how many keys were removed. Raises if a node is down."""
        removed, failed = await self.apply_parts(plan, skip_down=False)
        if failed:
            raise redis.ConnectionError(f"cache nodes unreachable: {', '.join(sorted(self.down))}")
        return removed

    async def apply_parts(self, plan: Plan, *, skip_down: bool = True) -> tuple[int, Plan]:
        """Carry out what ``plan`` can: (keys removed, the part left on unreachable nodes).

        Standalone: all or an exception. Cluster: each node's part on its own, so one node that
        does not answer keeps only its own keys back; with ``skip_down``, nodes that failed
        lately are not tried (their keys go straight to the part left; a retry probes them).
        """
        if not plan:
            return 0, Plan()
        if not self.cluster:
            return await self._apply_standalone(plan), Plan()
        removed, failed = 0, Plan()
        for node, part in (await self._by_node(plan)).items():
            name = node.name if node is not None else ""
            if skip_down and name in self.down:
                failed.extend(part)
                continue
            try:
                removed += await self._on_node(node, part)
            except CONNECTION_ERRORS as exc:
                self._node_failed(name, exc)
                failed.extend(part)
            else:
                self._node_answered(name)
        return removed, failed

    def _node_failed(self, name: str, exc: BaseException) -> None:
        if name not in self.down:
            log.warning("cache node %s unreachable (%s): its keys are retried apart", name, exc)
        self.down.add(name)

    def _node_answered(self, name: str) -> None:
        if name in self.down:
            log.info("cache node %s answers again", name)
            self.down.discard(name)

    async def _apply_standalone(self, plan: Plan) -> int:
        if not plan.expire and not plan.fenced:
            async with self.client.pipeline(transaction=False) as pipe:
                queue_unlink(pipe, plan.unlink)
                return sum(await pipe.execute())
        removed = await self._bulk(None, Plan(unlink=plan.unlink, expire=plan.expire))
        if plan.fenced:
            removed += await self._by_slot(Plan(fenced=plan.fenced))
        return removed

    async def _on_node(self, node: ClusterNode | None, part: Plan) -> int:
        removed = 0
        if part.unlink or part.expire:
            removed += await self._bulk(node, Plan(unlink=part.unlink, expire=part.expire))
        if part.fenced:
            removed += await self._by_slot(Plan(fenced=part.fenced))
        return removed

    async def _by_node(self, plan: Plan) -> dict[ClusterNode | None, Plan]:
        """The plan's effects split by the node that serves them (None: standalone)."""
        if not isinstance(self.client, RedisCluster):
            return {None: plan}
        await self.client.initialize()
        parts: dict[ClusterNode | None, Plan] = defaultdict(Plan)
        node_of: Any = self.client.get_node_from_key  # takes bytes too (it hashes the encoding)
        for key in plan.unlink:
            parts[node_of(key)].unlink.append(key)
        for key, ttl in plan.expire:
            parts[node_of(key)].expire.append((key, ttl))
        for key, version, ttl in plan.fenced:
            parts[node_of(key)].fenced.append((key, version, ttl))
        return parts

    async def _bulk(self, node: ClusterNode | None, part: Plan) -> int:
        """``part`` on one node in script calls; what the node refuses, command by command."""
        replies: list[Any]
        try:
            if node is None:
                async with self.client.pipeline(transaction=False) as pipe:
                    for args in _bulk_args(part):
                        pipe.execute_command("EVAL", BULK_SCRIPT, 0, *args)
                    replies = await pipe.execute()
            else:
                replies = [
                    await self.client.execute_command(
                        "EVAL", BULK_SCRIPT, 0, *args, target_nodes=node
                    )
                    for args in _bulk_args(part)
                ]
        except redis.ResponseError as exc:
            if not self._refused:
                log.warning("cache refused the one-script apply (%s); applying key by key", exc)
            self._refused = True
            return await self._by_slot(part)
        removed = sum(int(reply[0]) for reply in replies)
        refused = Plan()
        asked = 0
        for _removed, unlinks, expires, ask in replies:
            refused.unlink += unlinks  # bytes: a key need not be UTF-8
            refused.expire += [(expires[i], int(expires[i + 1])) for i in range(0, len(expires), 2)]
            asked += int(ask)
        if refused:
            self.redirected(len(refused.unlink) + len(refused.expire), asked=asked)
            removed += await self._by_slot(refused)
        return removed

    def redirected(self, keys: int, *, asked: int = 0) -> None:
        """Keys a node no longer serves (MOVED) or serves only in part (ASK: a migration), redone
        through the cluster client, which follows the redirection. Counted; logged at INFO at
        most every :data:`REDIRECT_LOG_EVERY_S`."""
        if self._redirects is not None:
            self._redirects.labels(self._region, "moved").inc(keys - asked)
            self._redirects.labels(self._region, "ask").inc(asked)
        self._redirects_unlogged += keys
        now = time.monotonic()
        if now - self._redirect_logged >= REDIRECT_LOG_EVERY_S:
            log.info(
                "%d keys were not served by the node expected (resharding?): redone through the "
                "cluster client's redirections",
                self._redirects_unlogged,
            )
            self._redirect_logged, self._redirects_unlogged = now, 0

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
            if owner is not None and not any(c in tag for c in WILDCARDS):
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
