"""What the stages of one region's gateway share: clients, clocks, epoch, cache and friends.

:func:`open_region` makes the clients (closed with the exit stack), and :meth:`Region.prepare`
reads what must be known before any stage starts, retried until the region's Redis answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msgspec
from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio.cluster import RedisCluster

from invalgw.cache import Cache
from invalgw.clock import ServerClock, sample_clock
from invalgw.config import RedisEndpoint, RegionConfig
from invalgw.connections import AsyncRedis, Connector, close, connect_cache, count_errors
from invalgw.deadletter import REASONS as DEAD_LETTER_REASONS
from invalgw.deadletter import DeadLetters
from invalgw.epoch import Epoch
from invalgw.functions import load_library
from invalgw.gaps import Gaps
from invalgw.lag import LinkStatus, status_decoder
from invalgw.metrics import Metrics
from invalgw.names import Names
from invalgw.policy import Resolver
from invalgw.proto import Invalidation
from invalgw.retries import CacheRetries
from invalgw.scanner import ScanJob, Scanner
from invalgw.stages import Drain
from invalgw.tracing import InvalidationTracer

log = logging.getLogger(__name__)


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

    @property
    def name(self) -> str:
        return self.config.region

    def counts_errors(self, stage: str) -> Callable[[Exception], None]:
        """An error counter for ``stage``: a forwarder's errors count against its peer."""
        target = stage[3:] if stage.startswith("to:") else self.name
        counter = self.metrics.redis_errors.labels(self.name, target)
        return lambda _exc: counter.inc()

    async def prepare(self) -> None:
        """What every stage needs from the region's Redis before it starts."""
        await load_library(self.local)  # what the peers' senders call here
        await self.epoch.load()
        await sample_clock(self.local_clock, self.local)
        saved = await self.local.hgetall(self.names.status)
        for origin in self.config.regions:
            raw = saved.get(origin.encode())
            status = LinkStatus(origin=origin, region=self.name)
            if raw is not None:
                try:
                    status = status_decoder.decode(raw)
                except ValueError:
                    log.warning("ignoring unreadable saved status for %s", origin)
            self.statuses[origin] = status


def open_region(
    config: RegionConfig,
    *,
    stack: AsyncExitStack,
    metrics: Metrics,
    drain: Drain,
    connector: Connector,
    tracer_provider: TracerProvider | None,
) -> Region:
    """Make the region's clients (closed by ``stack``) and the parts built on them."""

    def client(endpoint: RedisEndpoint, role: str) -> AsyncRedis:
        return connector(endpoint, name=f"invalgw:{config.region}:{role}")

    local = client(config.redis, "local")
    reads = client(msgspec.structs.replace(config.redis, retries=0), "reads")
    cache_client: AsyncRedis | RedisCluster = local
    if config.cache is not None:
        cache_client = connect_cache(config.cache, name=f"invalgw:{config.region}:cache")
    peers = {peer.name: client(peer, f"to:{peer.name}") for peer in config.peers}
    for each in {id(c): c for c in (local, reads, cache_client, *peers.values())}.values():
        stack.push_async_callback(close, each)
    for target, each in [
        (config.region, local),
        (config.region, reads),
        (config.region, cache_client),
        *peers.items(),
    ]:
        _count_errors(each, metrics, config.region, target)

    names = Names(config.streams.namespace, config.streams.local)
    metrics.start_at_zero(config.regions, DEAD_LETTER_REASONS)
    cache = Cache(
        cache_client,
        fence_ttl_ms=config.policy.fence_ttl_ms,
        in_stream_redis=config.cache is None,
        region=config.region,
        metrics=metrics,
    )
    resolver = Resolver(config.policy, config.region, config.regions)
    dead_letters = DeadLetters(
        local,
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
    )


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
