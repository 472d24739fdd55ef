"""Periodic chores around a region's stages: trimming streams, sampling clocks, publishing status.

Trimming follows the slowest consumer group: an entry goes only once every group (local apply and
every peer) has acknowledged it. Above the hard cap the oldest entries go anyway, and every group
that had not received them gets a gap, recorded and sent on to its peer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from functools import partial

import anyio
import anyio.abc
import redis

from invalgw.clock import sample_clock
from invalgw.connections import REDIS_ERRORS, AsyncRedis
from invalgw.lag import publish_status
from invalgw.names import APPLY_GROUP, forward_group
from invalgw.pipeline import Pipeline
from invalgw.proto import StreamId
from invalgw.region import Region

log = logging.getLogger(__name__)

OnGap = Callable[[str, str, str], Awaitable[None]]
"""Called with (group, after, upto) when trimming deleted entries a group had not received."""


@dataclass
class GroupPosition:
    name: str
    last_delivered: StreamId
    pending: int
    lag: int | None


async def group_positions(client: AsyncRedis, stream: str) -> list[GroupPosition]:
    groups = await client.xinfo_groups(stream)
    return [
        GroupPosition(
            name=group["name"].decode(errors="backslashreplace"),  # anyone may name a group
            last_delivered=StreamId.parse(group["last-delivered-id"]),
            pending=int(group["pending"]),
            lag=None if group.get("lag") is None else int(group["lag"]),
        )
        for group in groups
    ]


async def trim_stream(
    client: AsyncRedis,
    stream: str,
    *,
    max_len: int,
    on_gap: OnGap | None = None,
    groups_needed: Collection[str] = (),
) -> list[GroupPosition]:
    """Trim ``stream`` below its slowest group, then to ``max_len``; returns group positions.

    Nothing is trimmed while one of ``groups_needed`` is missing (being recreated after the
    stream was lost): the groups present do not say what the missing one still needs.
    """
    try:
        groups = await group_positions(client, stream)
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return []
        raise
    missing = set(groups_needed) - {group.name for group in groups}
    if not groups or missing:
        if missing:
            log.debug("not trimming %s: groups %s do not exist yet", stream, sorted(missing))
        return groups
    if groups_needed:
        groups = _without_strangers(stream, groups, groups_needed)
    floor: StreamId | None = None
    for group in groups:
        position = group.last_delivered
        if group.pending:
            summary = await client.xpending(stream, group.name)
            if summary.get("min") is not None:
                position = min(position, StreamId.parse(summary["min"]))
        floor = position if floor is None else min(floor, position)
    if floor is not None and floor.ms > 0:
        await client.xtrim(stream, minid=str(floor), approximate=True)
    if await client.xlen(stream) > max_len:
        await client.xtrim(stream, maxlen=max_len, approximate=True)
        info = await client.xinfo_stream(stream)
        deleted = StreamId.parse(info.get("max-deleted-entry-id", b"0-0"))
        for group in groups:
            if group.last_delivered < deleted:
                log.warning(
                    "stream %s is over its cap of %d entries: group %s loses entries after %s",
                    stream,
                    max_len,
                    group.name,
                    group.last_delivered,
                )
                if on_gap is not None:
                    await on_gap(group.name, str(group.last_delivered), str(deleted))
    return groups


_strangers_named: set[tuple[str, str]] = set()


def _without_strangers(
    stream: str, groups: list[GroupPosition], needed: Collection[str]
) -> list[GroupPosition]:
    """The groups that hold trimming back: a group no stage reads (a peer removed from the
    config) would otherwise keep the stream at its hard cap for good."""
    for group in groups:
        if group.name not in needed and (stream, group.name) not in _strangers_named:
            _strangers_named.add((stream, group.name))
            log.warning(
                "consumer group %r of stream %s belongs to no configured peer: trimming no longer "
                "waits for it. If its peer is gone for good: XGROUP DESTROY %s %s",
                group.name,
                stream,
                stream,
                group.name,
            )
    return [group for group in groups if group.name in needed]


async def every(
    interval_s: float,
    chore: Callable[[], Awaitable[None]],
    *,
    name: str,
    on_error: Callable[[Exception], None] | None = None,
) -> None:
    """Run ``chore`` every ``interval_s`` seconds until cancelled; errors are logged, not fatal."""
    failures = 0
    while True:
        try:
            await chore()
            failures = 0
        except REDIS_ERRORS as exc:
            failures += 1
            if on_error is not None:
                on_error(exc)
            level = logging.WARNING if failures in (1, 10) or failures % 100 == 0 else logging.DEBUG
            log.log(level, "%s failed (%d in a row): %s", name, failures, exc)
        await anyio.sleep(interval_s)


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
