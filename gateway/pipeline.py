"""The pipeline stages of one region:

- ``apply``: reads the local stream (its consumer group, the only one read), applies each batch
  to this region's cache at once and hands it to every sender through the in-memory feed;
- ``to:<peer>``: the sender to one peer's mirror stream, fed from memory; its consumer group on
  the local stream is only its durable cursor (and where it catches up from when behind);
- ``from:<peer>``: the mirror stream from a peer → this region's cache, one per peer (one per
  partition of a peer's stream, ``from:<peer>:<q>``, spread over this region's partitions).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from invalgw.apply import ApplyContext, LocalApplier
from invalgw.connections import AsyncRedis
from invalgw.epoch import EpochWatch
from invalgw.feed import Feed
from invalgw.forward import Forwarder
from invalgw.lag import StatusSource
from invalgw.mirror import MirrorApplier
from invalgw.names import APPLY_GROUP, forward_group
from invalgw.poison import PoisonGuard
from invalgw.proto import StreamId
from invalgw.read import GroupReader
from invalgw.region import MirrorSource, Region
from invalgw.stages import Handler, Runnable, Stage


@dataclass
class Pipeline:
    stages: list[Runnable] = field(default_factory=list)
    forwarders: dict[str, Forwarder] = field(default_factory=dict)
    status_sources: list[StatusSource] = field(default_factory=list)
    """Saved in the region's (or partition's) status hash."""
    mirror_status: list[tuple[MirrorSource, StatusSource]] = field(default_factory=list)
    """Saved each in its own hash, in its mirror's slot (when a side is partitioned)."""


def build_pipeline(region: Region) -> Pipeline:
    pipeline = Pipeline()
    config, names = region.config, region.names
    feed = Feed()

    ctx = ApplyContext(
        region=region.name,
        cache=region.cache,
        retries=region.retries,
        dead_letters=region.dead_letters,
        gaps=region.gaps,
        limits=config.guard,
        metrics=region.metrics,
        resolver=region.resolver,
        scanner=region.scanner,
        tracer=region.tracer,
        status_key=names.status,
        fence=region.fence,
    )
    local = LocalApplier(
        ctx,
        reader=_reader(region, names.local_stream, APPLY_GROUP, "apply", linger=True),
        clock=region.local_clock,
        status=region.statuses[region.name],
        epoch=region.epoch,
        feed=feed,
    )

    async def local_entries_lost(ids: list[bytes]) -> None:
        await region.gaps.record(
            region.name,
            "local entries deleted before they were applied",
            after=str(StreamId.parse(ids[0]).previous()),
            upto=ids[-1].decode(),
        )

    pipeline.stages.append(_stage(region, "apply", local.reader, local, on_lost=local_entries_lost))
    pipeline.status_sources.append(
        StatusSource(region.statuses[region.name], local.record.window, region.local_clock.now_ms)
    )

    for peer in config.peers:
        name = f"to:{peer.name}"
        forwarder = Forwarder(
            region=region.name,
            peer=peer.name,
            reader=_reader(region, names.local_stream, forward_group(peer.name), name),
            local=region.local,
            remote=region.peers[peer.name],
            names=names,
            epoch=region.epoch,
            clock=region.local_clock,
            metrics=region.metrics,
            limits=config.guard,
            mirror_max_len=config.streams.mirror_max_len,
            heartbeat_interval_ms=config.gateway.heartbeat_interval_ms,
            drain=region.drain,
            tracer=region.tracer,
            feed=feed,
            fence=region.fence,
            feed_bound=config.gateway.feed_batches,
            window=config.gateway.window_batches,
            claim_interval_ms=config.gateway.claim_interval_ms,
            claim_idle_ms=config.gateway.claim_idle_ms,
            backoff_cap_ms=config.gateway.retry_backoff_cap_ms,
            on_error=region.counts_errors(name),
            dead_letters=region.dead_letters,
        )
        pipeline.forwarders[peer.name] = forwarder
        pipeline.stages.append(forwarder)

    for source in region.mirrors:
        _mirror_stage(region, pipeline, ctx, source)
    return pipeline


def _mirror_stage(
    region: Region, pipeline: Pipeline, ctx: ApplyContext, source: MirrorSource
) -> None:
    """The apply of one mirror stream: ``from:<origin>`` (``from:<origin>:<q>`` for partition
    ``q`` of a partitioned origin)."""
    name = f"from:{source.origin}"
    if source.partition is not None:
        name += f":{source.partition}"
    reader = _reader(region, source.stream, APPLY_GROUP, name, client=source.reads)
    mirror = MirrorApplier(
        # on a Redis Cluster the mirror's slot is not the lease's
        replace(
            ctx,
            status_key=source.status_key,
            fence=None if region.config.redis.cluster else ctx.fence,
        ),
        origin=source.origin,
        reader=reader,
        origin_clock=region.peer_clocks[source.origin],
        local_clock=region.local_clock,
        status=source.status,
    )
    pipeline.stages.append(_stage(region, name, mirror.reader, mirror))
    status = StatusSource(source.status, mirror.record.window, mirror.origin_now_ms)
    if source.status_key == region.names.status:
        pipeline.status_sources.append(status)
    else:
        pipeline.mirror_status.append((source, status))


def _reader(
    region: Region,
    stream: str,
    group: str,
    stage: str,
    *,
    client: AsyncRedis | None = None,
    linger: bool = False,
) -> GroupReader:
    """A reader whose lost group is counted; on the local stream a lost group also means lost
    history, hence a new epoch (the peers record the gap)."""
    watch = EpochWatch(region.epoch) if stream == region.names.local_stream else None
    recreated_counter = region.metrics.groups_recreated.labels(region.name, stage)

    async def recreated() -> None:
        recreated_counter.inc()
        if watch is not None:
            await watch.history_lost()

    tuning = region.config.gateway
    return GroupReader(
        client or region.reads,
        stream,
        group,
        region.config.consumer,
        count=tuning.batch_size,
        block_ms=min(tuning.block_ms, tuning.heartbeat_interval_ms),
        linger_ms=tuning.linger_ms if linger else 0,
        on_recreated=recreated,
        on_read=watch.read_ok if watch is not None else None,
    )


def _stage(
    region: Region,
    name: str,
    reader: GroupReader,
    handler: Handler,
    *,
    on_lost: Callable[[list[bytes]], Awaitable[None]] | None = None,
) -> Stage:
    tuning = region.config.gateway
    return Stage(
        name,
        reader,
        PoisonGuard(handler, reader, region.dead_letters, name=name),
        drain=region.drain,
        on_error=region.counts_errors(name),
        on_claimed=region.metrics.reclaimed.labels(region.name, name).inc,
        on_lost=on_lost,
        fence=region.fence,
        claim_interval_ms=tuning.claim_interval_ms,
        claim_idle_ms=tuning.claim_idle_ms,
        backoff_cap_ms=tuning.retry_backoff_cap_ms,
    )
