"""One region's gateway: its stages and chores, run until drained, and the process around it.

The stages are in :mod:`invalgw.pipeline`, the parts they share in :mod:`invalgw.region`, the
periodic work in :mod:`invalgw.housekeeping`. :func:`serve` adds what a supervised process needs:
signals, a bounded drain, an exit status, and flushing traces on the way out.
"""

from __future__ import annotations

import gc
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from functools import partial

import anyio
import anyio.abc
import anyio.to_thread
import redis
from opentelemetry.sdk.trace import TracerProvider

from invalgw import logs, tracing
from invalgw.config import RedisEndpoint, RegionConfig, redact
from invalgw.connections import REDIS_ERRORS, Connector, connect
from invalgw.errors import GatewayError
from invalgw.forward import Forwarder
from invalgw.functions import Fence
from invalgw.health import Health, health_app, serve_http
from invalgw.housekeeping import Chores
from invalgw.lease import RegionLease
from invalgw.metrics import Metrics
from invalgw.pipeline import build_pipeline
from invalgw.region import Region, open_region, routed_keys
from invalgw.sharing import Sharing
from invalgw.stages import Drain, backoff_seconds, log_failure, until_ok
from invalgw.topology import Topology

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 50_000
"""Allocations between young-generation collections (CPython's default is 700)."""


class Gateway:
    def __init__(
        self,
        config: RegionConfig,
        *,
        metrics: Metrics | None = None,
        tracer_provider: TracerProvider | None = None,
        connector: Connector = connect,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics(config.region)
        self.tracer_provider = tracer_provider
        self.connector = connector
        self.drain = Drain()
        self.forwarders: dict[str, Forwarder] = {}
        self.lease_lost = False
        """Another gateway of this region took over (or the lease expired): this one stopped."""
        self.health = Health(config.gateway.lease_ms)
        """What ``/healthz`` and ``/readyz`` answer."""
        self._force = anyio.CancelScope()

    def request_drain(self) -> None:
        """Finish the batches in hand, acknowledge them, and stop (first SIGTERM)."""
        if not self.drain.requested:
            log.info("draining: finishing the batches in hand")
        self.health.draining = True
        self.drain.request()

    def force_stop(self) -> None:
        """Stop at once (second SIGTERM); unacknowledged entries are redelivered on restart."""
        self._force.cancel()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until drained or force-stopped; reports ready when every stage has started."""
        with self._force:
            async with anyio.create_task_group() as ticks, AsyncExitStack() as stack:
                self._serve_metrics(stack)
                ticks.start_soon(self.health.keep_ticking)
                stack.callback(ticks.cancel_scope.cancel)
                topology = await self._topology()
                region = open_region(
                    self.config,
                    stack=stack,
                    metrics=self.metrics,
                    drain=self.drain,
                    connector=self.connector,
                    tracer_provider=self.tracer_provider,
                    topology=topology,
                )
                parts = region.partitions()
                ready = topology is not None or not routed_keys(self.config)
                for part in parts if ready else []:
                    ready = ready and await until_ok(
                        partial(_refused_is_fatal, part),
                        self.drain,
                        name=f"{region.name}: connect",
                        on_error=region.counts_errors("connect"),
                    )
                if ready and len(parts) > 1:  # partitions shared by lease, no region lease
                    self.health.lease_held = True
                    await Sharing(region, parts).run(task_status=task_status)
                    return
                lease = RegionLease(
                    region.local,
                    region.names.lease,
                    self.config.consumer,
                    ttl_ms=self.config.gateway.lease_ms,
                )
                if ready:
                    ready = await self._take_lease(region, lease)
                if not ready:  # drained before the region's Redis answered, or as a standby
                    task_status.started()
                    return
                stack.push_async_callback(self._release_lease, lease)
                await self._run(region, parts, lease, task_status)

    async def _topology(self) -> Topology | None:
        """For each Redis Cluster (the region's stream Redis, ``""``, or a peer's), the node
        serving each key the gateway uses there (re-read when one moves: see
        :mod:`invalgw.topology`); None when there is none, or if drained before they answered."""
        config = self.config
        wanted = routed_keys(config)
        if not wanted:
            return None
        endpoints: dict[str, RedisEndpoint] = {"": config.redis}
        endpoints.update((peer.name, peer) for peer in config.peers)
        topology = Topology(endpoints, wanted)
        name = f"{config.region}: cluster nodes"
        read = await until_ok(topology.read, self.drain, name=name, on_error=_no_count)
        return topology if read else None

    async def _take_lease(self, region: Region, lease: RegionLease) -> bool:
        """Wait, as a standby, until this gateway holds the region's lease; False if drained."""
        held = self.metrics.lease_held.labels(region.name)
        held.set(0)
        waiting_since = time.monotonic()
        last_said = 0.0
        failures = 0
        while not self.drain.requested:
            try:
                holder = await lease.try_acquire()
            except REDIS_ERRORS as exc:
                failures += 1
                region.counts_errors("lease")(exc)
                log_failure(f"{region.name}: lease", exc, failures)
                await self.drain.sleep(backoff_seconds(failures))
                continue
            self.health.reached()
            if holder is None:
                held.set(1)
                self.health.lease_held = True
                if last_said:
                    log.info("%s: took over the region's lease", region.name)
                return True
            if time.monotonic() - last_said > 30:
                log.warning(
                    "%s: another gateway of this region holds its lease (%s) since %.0f s ago "
                    "or more; waiting as a standby",
                    region.name,
                    holder,
                    time.monotonic() - waiting_since,
                    extra={"lease_holder": holder},
                )
                last_said = time.monotonic()
            await self.drain.sleep(lease.renew_interval_s)
        return False

    async def _keep_lease(self, region: Region, lease: RegionLease) -> None:
        """Renew the lease until cancelled; if it is lost, stop everything at once."""
        while True:
            await anyio.sleep(lease.renew_interval_s)
            try:
                ours = await lease.renew()
            except REDIS_ERRORS as exc:  # nobody can take it there either; try again
                region.counts_errors("lease")(exc)
                log.warning("%s: cannot renew the region's lease: %s", region.name, exc)
                continue
            if ours:
                self.health.reached()
                continue
            log.error(
                "%s: another gateway of this region took its lease; stopping at once",
                region.name,
            )
            self.health.lease_held = False
            self.metrics.lease_held.labels(region.name).set(0)
            self.lease_lost = True
            self.force_stop()
            return

    async def _release_lease(self, lease: RegionLease) -> None:
        """Hand the lease over at once to a standby (unless it was lost)."""
        if self.lease_lost:
            return
        with anyio.move_on_after(2, shield=True):
            try:
                await lease.release()
            except REDIS_ERRORS as exc:
                log.debug("releasing the region's lease: %s", exc)
        self.metrics.lease_held.labels(self.config.region).set(0)
        self.health.lease_held = False

    async def _run(
        self,
        region: Region,
        parts: list[Region],
        lease: RegionLease,
        task_status: anyio.abc.TaskStatus[None],
    ) -> None:
        """Run the stages of every partition (the region's, when not partitioned)."""
        fence = Fence(region.names.lease, lease.value, lease.renewed_lately)
        parts = [replace(part, fence=fence) for part in parts]
        pipelines = [build_pipeline(part) for part in parts]
        self.forwarders = pipelines[0].forwarders
        chores = [Chores(part, pipeline) for part, pipeline in zip(parts, pipelines, strict=True)]
        stages = [stage for pipeline in pipelines for stage in pipeline.stages]
        async with anyio.create_task_group() as background:
            for each in chores:
                each.start(background)
            background.start_soon(self._keep_lease, region, lease)
            if region.topology is not None:
                background.start_soon(self._follow_peers, region)
            async with anyio.create_task_group() as workers:
                await workers.start(region.scanner.run)
                await workers.start(region.retries.run)
                for stage in stages:
                    await workers.start(stage.run)
                log.info(
                    "gateway %s running: %d stages, %d partitions, peers %s",
                    region.name,
                    len(stages),
                    len(parts),
                    ", ".join(region.peers) or "none",
                    extra={"peers": list(region.peers), "stages": len(stages)},
                )
                task_status.started()
            with anyio.move_on_after(2, shield=True):
                try:
                    for each in chores:
                        await each.publish_status()  # the last word on what was applied
                except REDIS_ERRORS as exc:
                    log.warning("could not save the final status: %s", exc)
            background.cancel_scope.cancel()

    async def _follow_peers(self, region: Region) -> None:
        """Unpartitioned, only peers' Redis may be clusters: when one answers MOVED (or a node
        stays unreachable), re-read its slot map and point the sender at the node now serving
        this region's mirror stream there."""
        topology, peer_route = region.topology, region.peer_route
        assert topology is not None
        assert peer_route is not None
        while True:
            await topology.wait(1.0)
            changed = await topology.refresh(topology.due())
            for peer, cause in changed.items():
                forwarder = self.forwarders.get(peer)
                if forwarder is not None:
                    forwarder.reroute(peer_route(peer, region.names.mirror(region.name)))
                    log.warning("%s: the sender to %s moved to another node", region.name, peer)
                    self.metrics.partition_reroutes.labels(region.name, cause).inc()

    def _serve_metrics(self, stack: AsyncExitStack) -> None:
        metrics = self.config.metrics
        if not metrics.port:
            return
        app = health_app(self.health, self.metrics.registry)
        try:
            server, _thread = serve_http(app, metrics.host, metrics.port)
        except OSError as exc:
            raise GatewayError(
                f"cannot serve metrics on {metrics.host}:{metrics.port} ({exc.strerror}); "
                "free the port or change [metrics] port"
            ) from None
        stack.callback(server.server_close)
        stack.callback(server.shutdown)
        log.info(
            "metrics on http://%s:%d/metrics, health on /healthz and /readyz",
            metrics.host,
            metrics.port,
        )


def _no_count(_exc: Exception) -> None:
    """Errors before the region's clients exist are logged only."""


async def _refused_is_fatal(region: Region) -> None:
    """:meth:`Region.prepare`, where a credential the region's Redis refuses (wrong password,
    or an ACL user without a command the gateway needs) stops the gateway with one clear line:
    retrying would not help."""
    url = redact(region.config.redis.url)
    try:
        await region.prepare()
    except redis.AuthenticationError as exc:
        raise GatewayError(f"{region.name} (redis): {url}: authentication failed: {exc}") from None
    except redis.exceptions.NoPermissionError as exc:
        raise GatewayError(
            f"{region.name} (redis): {url}: permission denied: {exc} (see invalgw acl)"
        ) from None


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


async def serve(config: RegionConfig, *, metrics: Metrics | None = None) -> int:
    """Run the gateway until SIGTERM/SIGINT; the exit status a supervisor understands.

    First signal: drain (finish and acknowledge the batches in hand, close, exit 0), or give up
    after ``gateway.drain_timeout_ms``. Second signal: stop at once, exit 128 + signal number.
    """
    tune_gc()
    logs.bind(region=config.region)
    provider = tracing.configure(f"invalgw-{config.region}")
    gateway = Gateway(config, metrics=metrics, tracer_provider=provider)
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

    try:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, signals)
                await gateway.run()
                tg.cancel_scope.cancel()
        if gateway.lease_lost:
            exit_code = 1
    finally:
        if provider is not None:  # flush what is buffered, but never hang on a dead collector
            await anyio.to_thread.run_sync(tracing.shutdown, provider)
    return exit_code
