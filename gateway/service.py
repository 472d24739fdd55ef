"""One region's gateway: wires the stages together and runs them until drained.

Stages (each its own consumer group, so each keeps its own cursor and backlog):

- ``apply``: the local stream → UNLINK in this region's cache;
- ``to:<peer>``: the local stream → the peer's mirror stream, one per peer;
- ``mirror <origin>``: a mirror stream in this region → UNLINK here, one per peer.

Around them: trimming, clock sampling and status publishing.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from functools import partial

import anyio
import anyio.abc
import msgspec
from prometheus_client import start_http_server

from gateway.applier import LocalApplier
from gateway.cache import Cache
from gateway.clock import ServerClock
from gateway.config import RedisEndpoint, RegionConfig
from gateway.connections import AsyncRedis, connect
from gateway.deadletter import DeadLetters
from gateway.epoch import Epoch
from gateway.forwarder import Forwarder
from gateway.gaps import Gaps
from gateway.groups import GroupReader
from gateway.housekeeping import StatusSource, every, publish_status, sample_clock, trim_stream
from gateway.lag import LinkStatus, status_decoder
from gateway.metrics import Metrics
from gateway.names import APPLY_GROUP, Names, forward_group
from gateway.receiver import MirrorApplier
from gateway.worker import Drain, Stage, until_ok

log = logging.getLogger(__name__)

CLOCK_SAMPLE_INTERVAL_S = 5.0
STATUS_INTERVAL_S = 1.0
GC_YOUNG_THRESHOLD = 50_000
"""Allocations between young-generation collections (CPython's default is 700)."""


class Gateway:
    def __init__(self, config: RegionConfig, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics(config.region)
        self.drain = Drain()
        self.names = Names(config.streams.namespace, config.streams.local)
        self.forwarders: dict[str, Forwarder] = {}
        self._force = anyio.CancelScope()

    def request_drain(self) -> None:
        """Finish the batches in hand, acknowledge them, and stop (first SIGTERM)."""
        if not self.drain.requested:
            log.info("draining: finishing the batches in hand")
        self.drain.request()

    def force_stop(self) -> None:
        """Stop at once (second SIGTERM); unacknowledged entries are redelivered on restart."""
        self._force.cancel()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until drained or force-stopped; reports ready when every stage has started."""
        with self._force:
            async with AsyncExitStack() as stack:
                await self._run(stack, task_status)

    def _client(self, endpoint: RedisEndpoint, role: str, *, retries: bool = True) -> AsyncRedis:
        if not retries:
            endpoint = msgspec.structs.replace(endpoint, retries=0)
        return connect(endpoint, name=f"invalgw:{self.config.region}:{role}")

    async def _run(self, stack: AsyncExitStack, task_status: anyio.abc.TaskStatus[None]) -> None:
        config, names, metrics = self.config, self.names, self.metrics
        region = config.region
        local = self._client(config.redis, "local")
        reads = self._client(config.redis, "reads", retries=False)
        cache_client = local if config.cache is None else self._client(config.cache, "cache")
        peers = {peer.name: self._client(peer, f"to:{peer.name}") for peer in config.peers}
        for client in {id(c): c for c in (local, reads, cache_client, *peers.values())}.values():
            stack.push_async_callback(_close, client)

        on_error = self._error_counter(region)
        local_clock = ServerClock()
        peer_clocks = {name: ServerClock() for name in peers}
        epoch = Epoch(local, names.epoch)
        ready = await until_ok(
            partial(self._prepare, epoch, local_clock, local),
            self.drain,
            name=f"{region}: connect",
            on_error=on_error("connect"),
        )
        if not ready:
            return
        cache = Cache(cache_client, in_stream_redis=config.cache is None)
        dead = DeadLetters(
            local,
            names.dead_letters,
            region=region,
            max_len=config.streams.dead_letter_max_len,
            metrics=metrics,
        )
        gaps = Gaps(local, names.gaps, region=region, metrics=metrics)
        statuses = await self._load_statuses(local, [region, *peers])
        tuning = config.gateway
        consumer = config.consumer

        async def rotate_epoch() -> None:
            metrics.groups_recreated.labels(region, "local").inc()
            await epoch.rotate(epoch.value)

        def reader(stream: str, group: str, *, on_recreated: bool = True) -> GroupReader:
            return GroupReader(
                reads,
                stream,
                group,
                consumer,
                count=tuning.batch_size,
                block_ms=min(tuning.block_ms, tuning.heartbeat_interval_ms),
                on_recreated=rotate_epoch if on_recreated else None,
            )

        def stage(name: str, group_reader: GroupReader, handler: object, **kw: object) -> Stage:
            return Stage(
                name,
                group_reader,
                handler,  # type: ignore[arg-type]
                drain=self.drain,
                on_error=on_error(name),
                claim_interval_ms=tuning.claim_interval_ms,
                claim_idle_ms=tuning.claim_idle_ms,
                backoff_cap_ms=tuning.retry_backoff_cap_ms,
                **kw,  # type: ignore[arg-type]
            )

        stages: list[Stage] = []
        apply_reader = reader(names.local_stream, APPLY_GROUP)
        local_applier = LocalApplier(
            region=region,
            reader=apply_reader,
            cache=cache,
            dead_letters=dead,
            gaps=gaps,
            limits=config.limits,
            metrics=metrics,
            clock=local_clock,
            status=statuses[region],
            status_key=names.status,
        )
        stages.append(stage("apply", apply_reader, local_applier))
        sources = [StatusSource(statuses[region], local_applier.window, local_clock.now_ms)]
        for peer in config.peers:
            forward_reader = reader(names.local_stream, forward_group(peer.name))
            forwarder = Forwarder(
                region=region,
                peer=peer.name,
                reader=forward_reader,
                local=local,
                remote=peers[peer.name],
                names=names,
                epoch=epoch,
                clock=local_clock,
                metrics=metrics,
                limits=config.limits,
                mirror_max_len=config.streams.mirror_max_len,
                heartbeat_interval_ms=tuning.heartbeat_interval_ms,
            )
            await forwarder.load()
            self.forwarders[peer.name] = forwarder
            stages.append(stage(f"to:{peer.name}", forward_reader, forwarder, idle=forwarder.idle))
            mirror_reader = reader(names.mirror(peer.name), APPLY_GROUP, on_recreated=False)
            mirror = MirrorApplier(
                region=region,
                origin=peer.name,
                reader=mirror_reader,
                cache=cache,
                dead_letters=dead,
                gaps=gaps,
                metrics=metrics,
                origin_clock=peer_clocks[peer.name],
                local_clock=local_clock,
                status=statuses[peer.name],
                status_key=names.status,
            )
            stages.append(stage(f"from:{peer.name}", mirror_reader, mirror))
            sources.append(StatusSource(statuses[peer.name], mirror.window, mirror.origin_now_ms))

        if config.metrics.port:
            server, _thread = start_http_server(
                config.metrics.port, config.metrics.host, registry=metrics.registry
            )
            stack.callback(server.shutdown)
            log.info("metrics on http://%s:%d/metrics", config.metrics.host, config.metrics.port)

        async def on_local_gap(group: str, after: str, upto: str) -> None:
            if group == APPLY_GROUP:
                await gaps.record(region, "trimmed before local apply", after=after, upto=upto)
            elif group.startswith("to:") and group[3:] in self.forwarders:
                await local.hset(
                    names.link(group[3:]), mapping={"gap_after": after, "gap_upto": upto}
                )
                self.forwarders[group[3:]].note_gap(after, upto)

        async def trim() -> None:
            positions = await trim_stream(
                local, names.local_stream, max_len=config.streams.max_len, on_gap=on_local_gap
            )
            for position in positions:
                backlog = position.pending + (position.lag or 0)
                metrics.backlog.labels(region, position.name).set(backlog)
            for peer in config.peers:
                await trim_stream(
                    local, names.mirror(peer.name), max_len=config.streams.mirror_max_len
                )

        async def sample_clocks() -> None:
            await sample_clock(local_clock, local)
            for name, client in peers.items():
                try:
                    await sample_clock(peer_clocks[name], client)
                except Exception as exc:
                    log.debug("clock sample of %s failed: %s", name, exc)
                    continue
                offset = peer_clocks[name].offset_ms - local_clock.offset_ms
                metrics.clock_offset.labels(region, name).set(offset / 1000)

        async def status() -> None:
            await publish_status(
                local, names.status, sources, local_clock=local_clock, metrics=metrics
            )

        async with anyio.create_task_group() as chores:
            trim_every = tuning.trim_interval_ms / 1000
            trim_errors = on_error("trim")
            chores.start_soon(partial(every, trim_every, trim, name="trim", on_error=trim_errors))
            chores.start_soon(partial(every, CLOCK_SAMPLE_INTERVAL_S, sample_clocks, name="clocks"))
            chores.start_soon(partial(every, STATUS_INTERVAL_S, status, name="status"))
            async with anyio.create_task_group() as workers:
                for each in stages:
                    await workers.start(each.run)
                log.info(
                    "gateway %s running: %d stages, peers %s",
                    region,
                    len(stages),
                    ", ".join(peers) or "none",
                )
                task_status.started()
            with anyio.move_on_after(2, shield=True):
                await status()
            chores.cancel_scope.cancel()

    async def _prepare(self, epoch: Epoch, clock: ServerClock, local: AsyncRedis) -> None:
        await epoch.load()
        await sample_clock(clock, local)

    async def _load_statuses(self, local: AsyncRedis, origins: list[str]) -> dict[str, LinkStatus]:
        saved = await local.hgetall(self.names.status)
        statuses: dict[str, LinkStatus] = {}
        for origin in origins:
            raw = saved.get(origin.encode())
            status = LinkStatus(origin=origin, region=self.config.region)
            if raw is not None:
                try:
                    status = status_decoder.decode(raw)
                except ValueError:
                    log.warning("ignoring unreadable saved status for %s", origin)
            statuses[origin] = status
        return statuses

    def _error_counter(self, region: str) -> Callable[[str], Callable[[Exception], None]]:
        def for_stage(stage: str) -> Callable[[Exception], None]:
            target = stage[3:] if stage.startswith("to:") else region

            def count(exc: Exception) -> None:
                self.metrics.redis_errors.labels(region, target).inc()

            return count

        return for_stage


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a process that handles batches.

    A batch of 500 entries allocates thousands of short-lived containers (reply lists, field
    dicts, invalidations), so with the default threshold every batch triggered several young
    collections, each traversing the batch still in use. Collecting every 50,000 allocations
    finds the batches already freed by reference counting; objects from start-up (imports,
    config) are frozen out of every collection. Cost: up to some megabytes of extra garbage.
    """
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def _close(client: AsyncRedis) -> None:
    with anyio.move_on_after(2, shield=True):
        await client.aclose()


async def serve(config: RegionConfig, *, metrics: Metrics | None = None) -> int:
    """Run the gateway until SIGTERM/SIGINT; the exit status a supervisor understands.

    First signal: drain (finish and acknowledge the batches in hand, close, exit 0), or give up
    after ``gateway.drain_timeout_ms``. Second signal: stop at once, exit 128 + signal number.
    """
    tune_gc()
    gateway = Gateway(config, metrics=metrics)
    exit_code = 0

    async def watch(signals: AsyncIterator[signal.Signals]) -> None:
        nonlocal exit_code
        async for signum in signals:
            if not gateway.drain.requested:
                log.info(
                    "received %s: draining (send it again to stop at once)",
                    signal.Signals(signum).name,
                )
                gateway.request_drain()
                tg.start_soon(deadline)
            else:
                log.warning("received %s again: stopping now", signal.Signals(signum).name)
                exit_code = 128 + signum
                gateway.force_stop()
                return

    async def deadline() -> None:
        nonlocal exit_code
        await anyio.sleep(config.gateway.drain_timeout_ms / 1000)
        log.warning("drain did not finish in %d ms: stopping now", config.gateway.drain_timeout_ms)
        exit_code = 1
        gateway.force_stop()

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, signals)
            await gateway.run()
            tg.cancel_scope.cancel()
    return exit_code
