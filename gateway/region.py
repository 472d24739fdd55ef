"""What the stages of one region's gateway share: clients, clocks, epoch, cache and friends.

:func:`open_region` makes the clients (closed with the exit stack), and :meth:`Region.prepare`
reads what must be known before any stage starts, retried until the region's Redis answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import msgspec
import redis
from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio.cluster import RedisCluster

from invalgw.cache import Cache
from invalgw.clock import ServerClock, sample_clock
from invalgw.config import RedisEndpoint, RegionConfig
from invalgw.connections import AsyncRedis, Connector, close, connect_cache, count_errors
from invalgw.deadletter import REASONS as DEAD_LETTER_REASONS
from invalgw.deadletter import DeadLetters
from invalgw.epoch import Epoch
from invalgw.functions import Fence, is_fenced, load_library
from invalgw.gaps import Gaps
from invalgw.lag import LinkStatus, status_decoder
from invalgw.metrics import Metrics
from invalgw.names import Names
from invalgw.policy import Resolver
from invalgw.proto import Invalidation
from invalgw.retries import CacheRetries
from invalgw.scanner import ScanJob, Scanner
from invalgw.stages import Drain
from invalgw.topology import Topology
from invalgw.tracing import InvalidationTracer

log = logging.getLogger(__name__)


@dataclass
class MirrorSource:
    """One mirror stream this region applies: from ``origin`` (partition ``partition`` of its
    stream, if partitioned), with the status hash and the client of its slot."""

    origin: str
    partition: int | None
    stream: str
    status_key: str
    client: AsyncRedis
    """For writes (the status) in the mirror's slot; also the reads' client on a standalone
    Redis."""
    reads: AsyncRedis
    status: LinkStatus


Route = Callable[[str, str], AsyncRedis]
"""(key, role) → a client of the Redis node serving ``key``'s slot (role ``local`` or
``reads``); on a standalone Redis always the region's ``local`` or ``reads`` client."""


@dataclass
class Region:
    config: RegionConfig
    names: Names
    metrics: Metrics
    drain: Drain
    local: AsyncRedis
    """The region's Redis, for writes and acknowledgements (retries on its own)."""
    reads: AsyncRedis
    """The same Redis for consumer-group reads: never retries on its own (see groups.py)."""
    peers: dict[str, AsyncRedis]
    cache: Cache
    resolver: Resolver
    tracer: InvalidationTracer
    scanner: Scanner
    retries: CacheRetries
    """Keys on cache nodes that did not answer, retried apart from the stream."""
    dead_letters: DeadLetters
    gaps: Gaps
    epoch: Epoch
    local_clock: ServerClock = field(default_factory=ServerClock)
    peer_clocks: dict[str, ServerClock] = field(default_factory=dict)
    statuses: dict[str, LinkStatus] = field(default_factory=dict)
    mirrors: list[MirrorSource] = field(default_factory=list)
    """The mirror streams this region (or partition of it) applies."""
    backlogs: dict[tuple[int | None, str], int] = field(default_factory=dict)
    """Per (partition, consumer group): entries not yet delivered, shared by the partitions a
    process runs, so ``invalgw_backlog_entries`` is their sum."""
    route: Route | None = None
    peer_route: Callable[[str, str], AsyncRedis] | None = None
    """(peer, key) → a client of the node serving ``key`` in the peer's Redis Cluster (or the
    peer's client)."""
    topology: Topology | None = None
    """The nodes ``route`` and ``peer_route`` follow, told of every error a stage sees."""
    fence: Fence | None = None
    """The lease this region's (or partition's) progress writes are conditional on: set once
    this process holds it."""

    def partitions(self) -> list[Region]:
        """The region once per partition of its stream, each with the names, clients, epoch,
        dead letters and gaps of its partition and the mirror streams it applies (mirror ``q``
        of an origin by partition ``q mod P``); cache, scanner, peers and clocks shared. An
        unpartitioned region is its one partition, applying every mirror."""
        config, route = self.config, self.route or (lambda _key, role: self.local)
        count = config.streams.partitions
        parts = [self] if count == 1 else [self._partition(p, count, route) for p in range(count)]
        spread = 0
        for peer in config.peers:
            for q in range(peer.partitions) if peer.partitions > 1 else [None]:
                part = parts[spread % len(parts)]
                spread += 1
                stream = part.names.mirror(peer.name, q)
                shared = count == 1 and q is None  # unpartitioned: today's status hash
                key = part.names.status if shared else part.names.mirror_status(peer.name, q)
                part.mirrors.append(
                    MirrorSource(
                        origin=peer.name,
                        partition=q,
                        stream=stream,
                        status_key=key,
                        client=route(stream, "local") if not shared else part.local,
                        reads=route(stream, "reads") if not shared else part.reads,
                        status=LinkStatus(origin=peer.name, region=self.name),
                    )
                )
        return parts

    def _partition(self, p: int, count: int, route: Route) -> Region:
        names = self.names.partition(p, count)
        local, reads = route(names.local_stream, "local"), route(names.local_stream, "reads")
        peer_route = self.peer_route or (lambda peer, _key: self.peers[peer])
        mirror = names.mirror(self.name, p)
        return replace(
            self,
            names=names,
            local=local,
            reads=reads,
            peers={peer: peer_route(peer, mirror) for peer in self.peers},
            dead_letters=DeadLetters(
                local,
                names.dead_letters,
                region=self.name,
                max_len=self.config.streams.dead_letter_max_len,
                metrics=self.metrics,
            ),
            gaps=Gaps(
                local, names.gaps, region=self.name, metrics=self.metrics, resync=self.gaps.resync
            ),
            epoch=Epoch(local, names.epoch),
            local_clock=ServerClock(),
            statuses={},
            mirrors=[],
        )

    @property
    def name(self) -> str:
        return self.config.region

    def counts_errors(self, stage: str) -> Callable[[Exception], None]:
        """An error counter for ``stage``: a forwarder's errors count against its peer."""
        target = stage[3:] if stage.startswith("to:") else self.name
        counter = self.metrics.redis_errors.labels(self.name, target)
        fenced = self.metrics.fenced.labels(self.name)
        topology, cluster = self.topology, "" if target == self.name else target

        def count(exc: Exception) -> None:
            counter.inc()
            if isinstance(exc, redis.ResponseError) and is_fenced(exc):
                fenced.inc()
            if topology is not None:
                topology.saw(cluster, exc)

        return count

    async def prepare(self) -> None:
        """What every stage needs from the region's Redis before it starts."""
        await load_library(self.local)  # what the peers' senders call here
        await self.epoch.load()
        await sample_clock(self.local_clock, self.local)
        saved: dict[Any, Any] = await self.local.hgetall(self.names.status)
        for origin in self.config.regions:
            self.statuses[origin] = self._saved_status(saved, origin)
        for mirror in self.mirrors:
            if mirror.status_key == self.names.status:
                mirror.status = self.statuses[mirror.origin]
                continue
            if mirror.client is not self.local:  # the mirror lives on another cluster node
                await load_library(mirror.client)
            own: dict[Any, Any] = await mirror.client.hgetall(mirror.status_key)
            mirror.status = self._saved_status(own, mirror.origin)

    def _saved_status(self, saved: dict[Any, Any], origin: str) -> LinkStatus:
        raw = saved.get(origin.encode())
        if raw is not None:
            try:
                return status_decoder.decode(raw)
            except ValueError:
                log.warning("ignoring unreadable saved status for %s", origin)
        return LinkStatus(origin=origin, region=self.name)


class Router:
    """The clients of a region: of its Redis and its peers' (closed by ``stack``), and, for a
    Redis Cluster, a client per node serving a key the gateway uses there (``nodes``)."""

    def __init__(
        self,
        config: RegionConfig,
        connector: Connector,
        stack: AsyncExitStack,
        metrics: Metrics,
        nodes: dict[str, dict[str, str]],
    ) -> None:
        self.config, self.connector, self.stack = config, connector, stack
        self.metrics, self.nodes = metrics, nodes
        self.endpoints: dict[str, RedisEndpoint] = {"": config.redis}
        self.endpoints.update((peer.name, peer) for peer in config.peers)
        self._routed: dict[tuple[str, str], AsyncRedis] = {}
        lease = Names(config.streams.namespace, config.streams.local).lease
        self.local = self._node("", lease, "local") or self._client("", config.redis, "local")
        self.reads = self._node("", lease, "reads") or self._client(
            "", msgspec.structs.replace(config.redis, retries=0), "reads"
        )
        self.peers = {
            peer.name: self._client(peer.name, peer, f"to:{peer.name}") for peer in config.peers
        }

    def _client(self, target: str, endpoint: RedisEndpoint, role: str) -> AsyncRedis:
        region = self.config.region
        made = self.connector(endpoint, name=f"invalgw:{region}:{role}")
        self.stack.push_async_callback(close, made)
        _count_errors(made, self.metrics, region, target or region)
        return made

    def _node(self, target: str, key: str, role: str) -> AsyncRedis | None:
        url = self.nodes.get(target, {}).get(key)
        if url is None:
            return None
        if (url, role) not in self._routed:
            endpoint = msgspec.structs.replace(self.endpoints[target], url=url, cluster=False)
            if role == "reads":
                endpoint = msgspec.structs.replace(endpoint, retries=0)
            name = f"to:{target}" if target else role
            self._routed[url, role] = self._client(target, endpoint, name)
        return self._routed[url, role]

    def route(self, key: str, role: str) -> AsyncRedis:
        """The client (``local`` or ``reads``) of the node serving ``key`` in the region's Redis."""
        found = self._node("", key, role)
        if found is None:
            return self.local if role == "local" else self.reads
        return found

    def peer_route(self, peer: str, key: str) -> AsyncRedis:
        """The client of the node serving ``key`` in ``peer``'s Redis."""
        return self._node(peer, key, "local") or self.peers[peer]


def open_region(
    config: RegionConfig,
    *,
    stack: AsyncExitStack,
    metrics: Metrics,
    drain: Drain,
    connector: Connector,
    tracer_provider: TracerProvider | None,
    topology: Topology | None = None,
) -> Region:
    """Make the region's clients (closed by ``stack``) and the parts built on them.

    ``topology``: per Redis Cluster (``""`` for the region's stream Redis, else a peer's name),
    the URL of the node serving each key the gateway uses there (see :func:`routed_keys`); each
    key is then reached through a client of its node, so every transaction and function call
    stays on one node (after the topology is refreshed, through a client of its new node)."""

    names = Names(config.streams.namespace, config.streams.local)
    router = Router(config, connector, stack, metrics, topology.nodes if topology else {})
    local, reads, route = router.local, router.reads, router.route
    cache_client: AsyncRedis | RedisCluster = local
    if config.cache is not None or config.redis.cluster:
        cache_client = connect_cache(config.cache_endpoint, name=f"invalgw:{config.region}:cache")
        stack.push_async_callback(close, cache_client)
        _count_errors(cache_client, metrics, config.region, config.region)
    peers = {name: router.peer_route(name, names.mirror(config.region)) for name in router.peers}

    metrics.start_at_zero(config.regions, DEAD_LETTER_REASONS)
    cache = Cache(
        cache_client,
        fence_ttl_ms=config.policy.fence_ttl_ms,
        in_stream_redis=config.cache is None and not config.redis.cluster,
        region=config.region,
        metrics=metrics,
    )
    resolver = Resolver(config.policy, config.region, config.regions)
    dead_letters = DeadLetters(
        route(names.dead_letters, "local"),
        names.dead_letters,
        region=config.region,
        max_len=config.streams.dead_letter_max_len,
        metrics=metrics,
    )
    scanner = Scanner(
        cache,
        resolver,
        region=config.region,
        metrics=metrics,
        drain=drain,
        dead_letters=dead_letters,
    )
    stack.callback(scanner.close)

    def resync(origin: str) -> None:
        """A gap from ``origin``: soft-expire what the policy names, staggered as usual. One
        walk per origin and pattern at a time: gaps recorded meanwhile join the walk queued."""
        for pattern in config.policy.resync_patterns:
            event = Invalidation(f"resync:{pattern}", "expire", [], pattern=pattern)
            scanner.submit(ScanJob(event, origin, _nothing))

    return Region(
        config=config,
        names=names,
        metrics=metrics,
        drain=drain,
        local=local,
        reads=reads,
        peers=peers,
        cache=cache,
        resolver=resolver,
        tracer=InvalidationTracer(
            config.region,
            tracer_provider,
            peers={peer.name: address for peer in config.peers if (address := _address(peer))},
        ),
        scanner=scanner,
        retries=CacheRetries(cache, drain=drain),
        dead_letters=dead_letters,
        gaps=Gaps(local, names.gaps, region=config.region, metrics=metrics, resync=resync),
        epoch=Epoch(local, names.epoch),
        peer_clocks={name: ServerClock() for name in peers},
        route=route,
        peer_route=router.peer_route,
        topology=topology,
    )


def routed_keys(config: RegionConfig) -> dict[str, list[str]]:
    """Per Redis Cluster (``""``: the region's stream Redis; a peer's name), the keys a gateway
    reaches there through the client of their own node (see ``nodes`` of :func:`open_region`)."""
    names = Names(config.streams.namespace, config.streams.local)
    peers = [peer.name for peer in config.peers]
    keys = [names.lease, names.dead_letters]
    count = config.streams.partitions
    for p in range(count):
        keys += names.partition(p, count).keys(peers)
    for peer in config.peers:
        for q in range(peer.partitions) if peer.partitions > 1 else [None]:
            keys.append(names.mirror(peer.name, q))
    routed = {"": keys} if config.redis.cluster else {}
    ours = [names.mirror(config.region)]
    ours += [names.mirror(config.region, p) for p in range(count)] if count > 1 else []
    routed.update((peer.name, ours) for peer in config.peers if peer.cluster)
    return routed


def _address(endpoint: RedisEndpoint) -> tuple[str, int] | None:
    """(host, port) of a TCP endpoint, for spans that cross to it; None for a unix socket."""
    parts = urlsplit(endpoint.url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        return None
    try:
        return parts.hostname, parts.port or 6379
    except ValueError:
        return None


def _count_errors(
    client: AsyncRedis | RedisCluster, metrics: Metrics, region: str, target: str
) -> None:
    """Count every connection error and retry of ``client``, those its retries absorb too."""
    errors = metrics.connection_errors.labels(region, target)
    retries = metrics.retries.labels(region, target)
    count_errors(client, lambda _exc: errors.inc(), lambda: retries.inc())


async def _nothing() -> None:
    """A resync has no stream entry to acknowledge."""
