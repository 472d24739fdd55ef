"""Which primary of a Redis Cluster serves each key the gateway uses there, kept up to date.

The gateway reaches each partition (and each mirror stream in a peer's cluster) through a
standalone client of the primary serving its slot, so every transaction and function call stays
on one node. After a resharding (a slot migrated to another primary) or a failover (a replica
promoted), that node answers ``MOVED`` or no longer answers: the stages report their errors here
(:meth:`Topology.saw`), and the partition's owner re-reads the slot map (:meth:`Topology.refresh`)
and restarts the partitions whose node changed, on the new one.

As redis-py's own cluster client does: a ``MOVED`` makes the map re-read at once (redis-py
patches the one slot, and re-reads the whole map every fifth ``MOVED``; the gateway has a few
keys, so it re-reads them all); a node that stays unreachable makes it re-read every
:data:`UNREACHABLE_S` (a failover shows once a replica is promoted); ``ASK`` and ``TRYAGAIN``
(a slot being migrated) are only retried, by the stage's own backoff, until the migration ends
and the source node answers ``MOVED``.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

import anyio
import redis

from invalgw.config import RedisEndpoint
from invalgw.connections import CONNECTION_ERRORS, cluster_nodes

log = logging.getLogger(__name__)

UNREACHABLE_S = 2.0
"""A cluster node failing this long (calls that failed after their retries) makes the slot map
re-read, then again every as long while it fails."""

MIN_INTERVAL_S = 0.5
"""At most one re-read of the slot map per this long, however many stages see ``MOVED``."""


def redirect_kind(exc: BaseException) -> str | None:
    """``moved``, ``ask`` (``ASK`` or ``TRYAGAIN``: a migration in progress), ``unreachable``
    (the node did not answer, or the cluster says it is down), or None for any other error."""
    if isinstance(exc, redis.exceptions.MovedError) or str(exc).startswith("MOVED "):
        return "moved"
    if isinstance(exc, redis.exceptions.AskError | redis.exceptions.TryAgainError):
        return "ask"
    if str(exc).startswith(("ASK ", "TRYAGAIN")):
        return "ask"
    if isinstance(exc, (*CONNECTION_ERRORS, redis.exceptions.ClusterDownError)):
        return "unreachable"
    return None


class Topology:
    """The node serving each key the gateway uses in each Redis Cluster (``""``: the region's
    stream Redis, else a peer's name), and what the stages saw that says it may have changed."""

    def __init__(self, endpoints: dict[str, RedisEndpoint], wanted: dict[str, list[str]]) -> None:
        self.endpoints = endpoints
        self.wanted = wanted
        self.nodes: dict[str, dict[str, str]] = {}
        """Per cluster, the URL of the node serving each wanted key (updated in place)."""
        self.moved: set[str] = set()
        """Clusters where a node answered ``MOVED`` since the last re-read."""
        self.failing: dict[str, float] = {}
        """Clusters where a node failed to answer, since when (monotonic)."""
        self._last = 0.0
        self._wake = anyio.Event()

    async def read(self) -> None:
        """Read the node of every wanted key (at start; raises the Redis error if one fails)."""
        for target, keys in self.wanted.items():
            self.nodes[target] = await cluster_nodes(self.endpoints[target], keys)

    def saw(self, target: str, exc: BaseException) -> None:
        """A stage's call to cluster ``target`` failed with ``exc``."""
        if target not in self.wanted:
            return
        kind = redirect_kind(exc)
        if kind == "moved":
            self.moved.add(target)
            self._wake.set()
        elif kind == "unreachable":
            self.failing.setdefault(target, time.monotonic())

    def due(self) -> dict[str, str]:
        """The clusters whose map should be re-read now, with why (``moved``, ``unreachable``)."""
        now = time.monotonic()
        if now - self._last < MIN_INTERVAL_S:
            return {}
        due = dict.fromkeys(self.moved, "moved")
        for target, since in self.failing.items():
            if target not in due and now - since >= UNREACHABLE_S:
                due[target] = "unreachable"
        return due

    async def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; sooner when a node answers ``MOVED``."""
        with anyio.move_on_after(seconds):
            await self._wake.wait()
        if self._wake.is_set():
            self._wake = anyio.Event()
            remaining = MIN_INTERVAL_S - (time.monotonic() - self._last)
            if remaining > 0:  # let a burst of MOVED from every stage arrive first
                await anyio.sleep(remaining)

    async def refresh(self, targets: dict[str, str], timeout_s: float = 5.0) -> dict[str, str]:
        """Re-read the map of ``targets`` (entering each cluster at its configured URL or any
        node known to serve it), within ``timeout_s`` in all; the clusters where a key's node
        changed, with why. A cluster that does not answer keeps its map, tried again later."""
        if not targets:
            return {}
        self._last = time.monotonic()
        changed: dict[str, str] = {}
        for target, cause in targets.items():
            self.moved.discard(target)
            self.failing.pop(target, None)
            known = sorted(set(self.nodes.get(target, {}).values()))
            found: dict[str, str] | None = None
            with anyio.move_on_after(timeout_s / len(targets)):
                try:
                    found = await cluster_nodes(self.endpoints[target], self.wanted[target], known)
                except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
                    log.warning("%s: cannot re-read its slot map: %s", _cluster(target), exc)
            if found is None:
                self.failing.setdefault(target, time.monotonic())
                continue
            before = self.nodes.get(target, {})
            moved = {key: url for key, url in found.items() if before.get(key) != url}
            self.nodes[target] = found
            if moved:
                changed[target] = cause
                log.warning(
                    "%s: %d keys the gateway uses are now served by another node (%s): %s",
                    _cluster(target),
                    len(moved),
                    cause,
                    ", ".join(sorted({_address(url) for url in moved.values()})),
                    extra={"cluster": target, "cause": cause},
                )
        return changed


def _cluster(target: str) -> str:
    return f"peer {target}'s cluster" if target else "the stream cluster"


def _address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"
