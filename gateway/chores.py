"""The periodic chores around a region's stages: trimming, clock sampling, status publishing."""

from __future__ import annotations

from functools import partial

import anyio.abc

from gateway.housekeeping import every, publish_status, sample_clock, trim_stream
from gateway.names import APPLY_GROUP, forward_group
from gateway.region import Region
from gateway.stages import Pipeline

CLOCK_SAMPLE_INTERVAL_S = 5.0
STATUS_INTERVAL_S = 1.0


class Chores:
    def __init__(self, region: Region, pipeline: Pipeline) -> None:
        self.region = region
        self.pipeline = pipeline

    def start(self, group: anyio.abc.TaskGroup) -> None:
        """Run every chore in ``group`` until it is cancelled; their errors are never fatal."""
        region = self.region
        trim_every = region.config.gateway.trim_interval_ms / 1000
        trim_errors = region.counts_errors("trim")
        group.start_soon(partial(every, trim_every, self.trim, name="trim", on_error=trim_errors))
        local_sample = partial(sample_clock, region.local_clock, region.local)
        group.start_soon(partial(every, CLOCK_SAMPLE_INTERVAL_S, local_sample, name="local clock"))
        for peer in region.peers:  # a task each: a peer that does not answer delays only its own
            peer_sample = partial(self.sample_peer_clock, peer)
            group.start_soon(
                partial(every, CLOCK_SAMPLE_INTERVAL_S, peer_sample, name=f"clock of {peer}")
            )
        group.start_soon(partial(every, STATUS_INTERVAL_S, self.publish_status, name="status"))

    async def trim(self) -> None:
        """Trim the local stream below its slowest group (and to its cap), then the mirrors."""
        region, config = self.region, self.region.config
        positions = await trim_stream(
            region.local,
            region.names.local_stream,
            max_len=config.streams.max_len,
            on_gap=self._trimmed_before_delivery,
            groups_needed=[APPLY_GROUP, *(forward_group(peer.name) for peer in config.peers)],
        )
        for position in positions:
            backlog = position.pending + (position.lag or 0)
            region.metrics.backlog.labels(region.name, position.name).set(backlog)
        for peer in config.peers:
            await trim_stream(
                region.local, region.names.mirror(peer.name), max_len=config.streams.mirror_max_len
            )

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
