"""Periodic chores of a gateway: trimming streams, sampling clocks, publishing status.

Trimming follows the slowest consumer group: an entry goes only once every group (local apply and
every peer) has acknowledged it. Above the hard cap the oldest entries go anyway, and every group
that had not received them gets a gap, recorded and sent on to its peer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import redis

from gateway.clock import ServerClock
from gateway.connections import REDIS_ERRORS, AsyncRedis
from gateway.lag import LagWindow, LinkStatus, status_encoder
from gateway.metrics import Metrics
from proto import StreamId

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
            name=group["name"].decode(),
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


async def sample_clock(clock: ServerClock, client: AsyncRedis, samples: int = 3) -> None:
    """A few TIME samples in a row; the least-delayed one wins."""
    for _ in range(samples):
        await clock.sample(client)


@dataclass
class StatusSource:
    status: LinkStatus
    window: LagWindow
    origin_now_ms: Callable[[], float]


async def publish_status(
    client: AsyncRedis,
    key: str,
    sources: Sequence[StatusSource],
    *,
    local_clock: ServerClock,
    metrics: Metrics,
) -> None:
    """Summarise each origin's lag window into its status and save them all (one HSET)."""
    mapping: dict[Any, Any] = {}
    for source in sources:
        status = source.status
        status.lag_p50_ms, status.lag_p99_ms, status.lag_max_ms = source.window.take()
        if status.heartbeat_ms:
            status.heartbeat_age_ms = max(0.0, source.origin_now_ms() - status.heartbeat_ms)
            metrics.heartbeat_age.labels(status.region, status.origin).set(
                status.heartbeat_age_ms / 1000
            )
        local_now_ms = local_clock.now_ms()
        status.origin_clock_offset_ms = source.origin_now_ms() - local_now_ms
        status.updated_ms = int(local_now_ms)
        mapping[status.origin] = status_encoder.encode(status)
    if mapping:
        await client.hset(key, mapping=mapping)
