"""Gateway processes of one region share its partitions by lease (see :mod:`invalgw.partlease`).

Each partition this process holds runs on its own (its stages and chores, its own drain), so it
can be started and stopped while the others go on: stopped at once when its lease is lost,
drained (the batches in hand finished and acknowledged) and released when another process asks
for it, and all of them drained and released when the process drains. Mirror streams go with
the partition that applies them (mirror ``q`` of an origin with partition ``q mod P``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from functools import partial

import anyio
import anyio.abc

from invalgw.connections import REDIS_ERRORS
from invalgw.functions import Fence
from invalgw.housekeeping import Chores
from invalgw.partlease import Lease, PartitionLeases
from invalgw.pipeline import build_pipeline
from invalgw.region import Region
from invalgw.stages import Drain, log_failure, until_ok
from invalgw.topology import Topology

log = logging.getLogger(__name__)


@dataclass
class Running:
    """One partition this process runs."""

    drain: Drain = field(default_factory=Drain)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)


class Sharing:
    def __init__(self, region: Region, parts: list[Region]) -> None:
        self.region = region
        self.parts = parts
        config = region.config
        self.leases = PartitionLeases(
            [
                Lease(p, part.names.lease, part.names.handover, part.local)
                for p, part in enumerate(parts)
            ],
            config.consumer,
            ttl_ms=config.gateway.lease_ms,
        )
        self.running: dict[int, Running] = {}
        self._owned = region.metrics.partitions_owned.labels(region.name)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Balance and run partitions until the region's drain; then drain and release them."""
        region = self.region
        failures = 0
        async with anyio.create_task_group() as tg:
            await tg.start(region.scanner.run)
            await tg.start(region.retries.run)
            started = False
            if region.topology is not None:
                tg.start_soon(self._follow, region.topology, tg)
            while not region.drain.requested:
                try:
                    decided = await self.leases.round()
                except REDIS_ERRORS as exc:
                    failures += 1
                    self._failed(exc, failures)
                else:
                    failures = failures + 1 if decided.failed else 0
                    for error in decided.failed:
                        self._failed(error, failures)
                    for p in decided.stop:
                        handing_over = p in self.leases.handing_over
                        tg.start_soon(self._stop, p, self.running.pop(p, None), handing_over)
                    for p in decided.start:
                        self.running[p] = running = Running()
                        tg.start_soon(self._run_partition, p, running)
                self._owned.set(len(self.leases.held))
                if not started:
                    started = True
                    log.info(
                        "gateway %s running: partitions shared by lease, %d held of %d",
                        region.name,
                        len(self.leases.held),
                        len(self.parts),
                    )
                    task_status.started()
                await region.drain.sleep(self.leases.interval_s)
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as stopping:
                    for p in list(self.running):
                        stopping.start_soon(self._stop, p, self.running.pop(p), True)
            self._owned.set(0)
            log.info("%s: every partition stopped and released", region.name)

    async def _follow(self, topology: Topology, tg: anyio.abc.TaskGroup) -> None:
        """Until the region's drain: re-read the slot map when the stages say a node answered
        MOVED (or stays unreachable), and move the partitions that moved (apart from the lease
        rounds, which a slow cluster must not delay)."""
        while not self.region.drain.requested:
            with self.region.drain.interruptible():
                await topology.wait(1.0)
            if not self.region.drain.requested:
                await self._reroute(topology, tg)

    async def _reroute(self, topology: Topology, tg: anyio.abc.TaskGroup) -> None:
        """Re-read the slot map of the clusters the stages saw answer MOVED (or stay
        unreachable); restart, at once, each partition whose keys (or whose mirror streams, here
        or in a peer's cluster) are now served by another node, with clients of the new node.
        Its lease, consumer groups, pending entries and cursors moved with the slot: it goes on
        where it stopped, and whatever it had not acknowledged is handled again."""
        changed = await topology.refresh(topology.due())
        if not changed or self.region.drain.requested:
            return
        cause = "moved" if "moved" in changed.values() else "unreachable"
        region = self.region
        if region.route is not None:  # the scanner's dead letters
            region.dead_letters.client = region.route(region.names.dead_letters, "local")
        fresh = region.partitions()
        for p, part in enumerate(fresh):
            if _clients(part) == _clients(self.parts[p]):
                continue
            self.parts[p] = part
            self.leases.leases[p].client = part.local
            region.metrics.partition_reroutes.labels(region.name, cause).inc()
            old = self.running.get(p)
            if old is None:  # its lease is followed there
                log.info("%s: partition %d is served by another node now", region.name, p)
                continue
            log.warning(
                "%s: partition %d is served by another node now: restarting it there",
                region.name,
                p,
            )
            self.running[p] = running = Running()
            tg.start_soon(self._restart, p, old, running)

    async def _restart(self, p: int, old: Running, running: Running) -> None:
        await self._stop(p, old, False)
        await self._run_partition(p, running)

    def _failed(self, exc: Exception, failures: int) -> None:
        if self.region.topology is not None:
            self.region.topology.saw("", exc)
        log_failure(f"{self.region.name}: partition leases", exc, failures)

    async def _stop(self, p: int, running: Running | None, release: bool) -> None:
        """Stop partition ``p``: drained then released, or (lost) at once and not released."""
        if running is None:
            return
        if release:
            running.drain.request()
            with anyio.move_on_after(self.region.config.gateway.drain_timeout_ms / 1000):
                await running.done.wait()
        running.scope.cancel()
        await running.done.wait()
        for key in [key for key in self.region.backlogs if key[0] == p]:  # no longer ours
            del self.region.backlogs[key]
        if release:
            with anyio.move_on_after(2, shield=True):
                try:
                    await self.leases.release(p)
                except REDIS_ERRORS as exc:
                    log.warning("partition %d: could not release its lease: %s", p, exc)
        log.info("%s: stopped partition %d", self.region.name, p)

    async def _run_partition(self, p: int, running: Running) -> None:
        renewed = partial(self.leases.renewed_lately, p)
        lease = Fence(self.parts[p].names.lease, self.leases.value, renewed)
        part = replace(self.parts[p], drain=running.drain, fence=lease)
        try:
            with running.scope:
                ready = await until_ok(
                    part.prepare,
                    running.drain,
                    name=f"{part.name}: partition {p}",
                    on_error=part.counts_errors("connect"),
                )
                if ready:
                    await _stages(part)
        finally:
            running.done.set()


def _clients(part: Region) -> list[object]:
    """The clients a partition's stages use: of its own node, peers' and mirrors' nodes."""
    mirrors = [client for mirror in part.mirrors for client in (mirror.client, mirror.reads)]
    return [part.local, part.reads, *part.peers.values(), *mirrors]


async def _stages(part: Region) -> None:
    pipeline = build_pipeline(part)
    chores = Chores(part, pipeline)
    async with anyio.create_task_group() as background:
        chores.start(background)
        async with anyio.create_task_group() as workers:
            for stage in pipeline.stages:
                await workers.start(stage.run)
            log.info("%s: running partition %s", part.name, part.names.partition_index)
        with anyio.move_on_after(2, shield=True):
            try:
                await chores.publish_status()
            except REDIS_ERRORS as exc:
                log.warning("could not save the final status: %s", exc)
        background.cancel_scope.cancel()
