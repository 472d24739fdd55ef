"""Periodic chores around a region's stages: trimming streams, sampling clocks, publishing status.

Trimming (:mod:`invalgw.trim`) follows the slowest consumer group; above the cap the oldest
entries go anyway, and every group that had not received them gets a gap, recorded and sent on to
its peer. The local stream is trimmed at least ten times a second, more often while it grows
fast; the mirrors every ``trim_interval_ms``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial

import anyio
import anyio.abc

from invalgw.clock import sample_clock
from invalgw.connections import REDIS_ERRORS
from invalgw.lag import publish_status
from invalgw.names import APPLY_GROUP, forward_group
from invalgw.pipeline import Pipeline
from invalgw.region import Region
from invalgw.trim import StreamTrimmer

log = logging.getLogger(__name__)


async def every(
    interval_s: float | Callable[[], float],
    chore: Callable[[], Awaitable[None]],
    *,
    name: str,
    on_error: Callable[[Exception], None] | None = None,
) -> None:
    """Start ``chore`` every ``interval_s`` seconds (a callable: asked after each run; a run
    longer than that starts the next at once) until cancelled; errors are logged, not fatal."""
    failures = 0
    while True:
        started = anyio.current_time()
        try:
            await chore()
            failures = 0
        except REDIS_ERRORS as exc:
            failures += 1
            if on_error is not None:
                on_error(exc)
            level = logging.WARNING if failures in (1, 10) or failures % 100 == 0 else logging.DEBUG
            log.log(level, "%s failed (%d in a row): %s", name, failures, exc)
        wait_s = interval_s() if callable(interval_s) else interval_s
        await anyio.sleep(max(0.0, started + wait_s - anyio.current_time()))


CLOCK_SAMPLE_INTERVAL_S = 5.0
STATUS_INTERVAL_S = 1.0


class Chores:
    def __init__(self, region: Region, pipeline: Pipeline) -> None:
        self.region = region
        self.pipeline = pipeline
        config, names = region.config, region.names
        self.local_trimmer = StreamTrimmer(
            region.local,
            names.local_stream,
            max_len=config.streams.max_len,
            on_gap=self._trimmed_before_delivery,
            groups_needed=[APPLY_GROUP, *(forward_group(peer.name) for peer in config.peers)],
            reported_key=names.lost,
            epoch_key=names.epoch,
        )
        self.mirror_trimmers = [
            StreamTrimmer(mirror.client, mirror.stream, max_len=config.streams.mirror_max_len)
            for mirror in region.mirrors
        ]
        self._mirrors_trimmed = 0.0

    def trim_interval_s(self) -> float:
        """``trim_interval_ms`` or, for the local stream, shorter: at least ten rounds a second,
        more while it grows fast near its cap (see :meth:`invalgw.trim.StreamTrimmer._pace`)."""
        every_s = self.region.config.gateway.trim_interval_ms / 1000
        return min(every_s, self.local_trimmer.interval_s)

    def start(self, group: anyio.abc.TaskGroup) -> None:
        """Run every chore in ``group`` until it is cancelled; their errors are never fatal."""
        region = self.region
        trim_errors = region.counts_errors("trim")
        group.start_soon(
            partial(every, self.trim_interval_s, self.trim, name="trim", on_error=trim_errors)
        )
        local_sample = partial(sample_clock, region.local_clock, region.local)
        group.start_soon(partial(every, CLOCK_SAMPLE_INTERVAL_S, local_sample, name="local clock"))
        for peer in region.peers:  # a task each: a peer that does not answer delays only its own
            peer_sample = partial(self.sample_peer_clock, peer)
            group.start_soon(
                partial(every, CLOCK_SAMPLE_INTERVAL_S, peer_sample, name=f"clock of {peer}")
            )
        group.start_soon(partial(every, STATUS_INTERVAL_S, self.publish_status, name="status"))

    async def trim(self) -> None:
        """Trim the local stream below its slowest group (and to its cap); the mirrors too, at
        the configured interval."""
        region = self.region
        partition = region.names.partition_index
        for position in await self.local_trimmer.round():
            backlogs = region.backlogs
            backlogs[partition, position.name] = position.backlog
            total = sum(v for (_p, group), v in backlogs.items() if group == position.name)
            region.metrics.backlog.labels(region.name, position.name).set(total)
        now = time.monotonic()
        if now - self._mirrors_trimmed >= region.config.gateway.trim_interval_ms / 1000:
            self._mirrors_trimmed = now
            for trimmer in self.mirror_trimmers:
                await trimmer.round()

    async def _trimmed_before_delivery(self, group: str, after: str, upto: str) -> None:
        if group == APPLY_GROUP:
            await self.region.gaps.record(
                self.region.name, "trimmed before local apply", after=after, upto=upto
            )
        elif group.startswith("to:") and group[3:] in self.pipeline.forwarders:
            await self.pipeline.forwarders[group[3:]].add_gap(after, upto)

    async def sample_peer_clock(self, peer: str) -> None:
        region = self.region
        clock = region.peer_clocks[peer]
        await sample_clock(clock, region.peers[peer])
        offset = clock.offset_ms - region.local_clock.offset_ms
        region.metrics.clock_offset.labels(region.name, peer).set(offset / 1000)

    async def publish_status(self) -> None:
        region = self.region
        region.statuses[region.name].epoch = region.epoch.value
        await publish_status(
            region.local,
            region.names.status,
            self.pipeline.status_sources,
            local_clock=region.local_clock,
            metrics=region.metrics,
        )
        for mirror, source in self.pipeline.mirror_status:
            await publish_status(
                mirror.client,
                mirror.status_key,
                [source],
                local_clock=region.local_clock,
                metrics=region.metrics,
            )
