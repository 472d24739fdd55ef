"""What ``invalgw lag`` reads of one region's Redis, in one pipeline, partitioned or not.

A region with ``[streams] partitions = P`` above 1 keeps its state per partition (see
:mod:`invalgw.names`): partition ``p``'s stream, consumer groups, status hash, lease, dead letters
and gaps all end with the partition's hash tag. Each mirror stream it applies (one per partition of
a partitioned peer) has its status in ``<namespace>:status:{<origin>:<q>}``. On a Redis Cluster the
pipeline goes through a cluster client, which sends each command to the node of its slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis
from redis.asyncio.cluster import RedisCluster

from invalgw.connections import AsyncRedis
from invalgw.lag import LinkStatus, status_decoder
from invalgw.names import APPLY_GROUP, Names
from invalgw.trim import GroupPosition, StreamState, unread


@dataclass(frozen=True)
class MirrorPlace:
    """One mirror stream a region applies: from ``origin`` (its partition ``partition``, None if
    the origin is not partitioned), applied by the region's partition ``applier``."""

    origin: str
    partition: int | None
    applier: int


def mirror_places(peers: Sequence[tuple[str, int]], partitions: int) -> list[MirrorPlace]:
    """The mirror streams of ``peers`` ((name, partitions) each) and the partition of a region of
    ``partitions`` that applies each: spread in turn, as :meth:`invalgw.region.Region.partitions`
    does."""
    places = []
    spread = 0
    for peer, count in peers:
        for q in range(count) if count > 1 else [None]:
            places.append(MirrorPlace(peer, q, spread % partitions))
            spread += 1
    return places


@dataclass
class PartReading:
    """One partition of a region's own stream (the stream itself when not partitioned)."""

    partition: int | None
    owner: str | None
    """The gateway process holding the partition's lease (the region's lease if unpartitioned)."""
    groups: dict[str, int | None]
    stream_length: int
    entries_added: int | None
    statuses: dict[str, LinkStatus]


@dataclass
class MirrorReading:
    place: MirrorPlace
    backlog: int | None
    """Envelopes in the mirror stream not yet applied."""
    status: LinkStatus | None
    owner: str | None


@dataclass
class RegionReading:
    """One region's replies from one round trip."""

    now_ms: float
    parts: list[PartReading]
    mirrors: list[MirrorReading]
    dead_letters: int
    gaps: int
    statuses: dict[str, list[LinkStatus]] = field(default_factory=dict)
    """Per origin: the status of each partition (or mirror stream) that reported on it."""

    def __post_init__(self) -> None:
        for part in self.parts:
            for origin, status in part.statuses.items():
                self.statuses.setdefault(origin, []).append(status)
        for mirror in self.mirrors:
            if mirror.status is not None:
                self.statuses.setdefault(mirror.place.origin, []).append(mirror.status)

    @property
    def stream_length(self) -> int:
        return sum(part.stream_length for part in self.parts)

    @property
    def entries_added(self) -> int | None:
        added = [part.entries_added for part in self.parts]
        return None if None in added else sum(a for a in added if a is not None)

    def backlog(self, group: str) -> int | None:
        """Entries of the region's stream ``group`` has not acknowledged, over every partition
        (a group not created yet has its whole partition ahead of it)."""
        total = 0
        for part in self.parts:
            left = part.groups.get(group, part.stream_length)
            if left is None:
                return None
            total += left
        return total

    def mirror_backlog(self, origin: str) -> int | None:
        total = 0
        for mirror in self.mirrors:
            if mirror.place.origin == origin:
                if mirror.backlog is None:
                    return None
                total += mirror.backlog
        return total


async def read_region(
    client: AsyncRedis | RedisCluster,
    names: Names,
    partitions: int,
    places: Sequence[MirrorPlace],
) -> RegionReading:
    """Read the region's status, groups, leases, dead letters and gaps (see the module)."""
    seconds, micros = await _server_time(client)
    parts = [names.partition(p, partitions) for p in range(partitions)]
    async with client.pipeline(transaction=False) as pipe:
        for part in parts:
            pipe.hgetall(part.status)
            pipe.xinfo_groups(part.local_stream)
            pipe.xinfo_stream(part.local_stream)
            pipe.get(part.lease)
            pipe.xlen(part.dead_letters)
            pipe.xlen(part.gaps)
        if partitions > 1:
            pipe.xlen(names.dead_letters)  # what the region's shared stages dead-letter
        for place in places:
            pipe.xinfo_groups(names.mirror(place.origin, place.partition))
            pipe.xinfo_stream(names.mirror(place.origin, place.partition))
            pipe.hgetall(names.mirror_status(place.origin, place.partition))
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    part_readings, dead, gaps = [], 0, 0
    for i in range(partitions):
        raw_status, groups, info, lease, part_dead, part_gaps = replies[6 * i : 6 * i + 6]
        for reply in (raw_status, lease, part_dead, part_gaps):
            if isinstance(reply, Exception):
                raise reply
        dead, gaps = dead + int(part_dead), gaps + int(part_gaps)
        stream = info if isinstance(info, dict) else {}
        part_readings.append(
            PartReading(
                partition=i if partitions > 1 else None,
                owner=_owner(lease),
                groups=backlogs(groups, info),
                stream_length=int(stream.get("length", 0)),
                entries_added=stream.get("entries-added"),
                statuses=_statuses(raw_status),
            )
        )
    rest = replies[6 * partitions :]
    if partitions > 1:
        if isinstance(rest[0], Exception):
            raise rest[0]
        dead += int(rest[0])
        rest = rest[1:]
    mirrors = []
    for i, place in enumerate(places):
        groups, info, raw_status = rest[3 * i : 3 * i + 3]
        # an unpartitioned region keeps an unpartitioned peer's status in its own status hash
        shared = partitions == 1 and place.partition is None
        own = part_readings[place.applier]
        status = (
            own.statuses.pop(place.origin, None)
            if shared
            else _statuses(raw_status).get(place.origin)
        )
        length = int(info["length"]) if isinstance(info, dict) else 0
        backlog = backlogs(groups, info).get(APPLY_GROUP, length)
        mirrors.append(MirrorReading(place, backlog, status, own.owner))
    return RegionReading(
        now_ms=seconds * 1000 + micros / 1000,
        parts=part_readings,
        mirrors=mirrors,
        dead_letters=dead,
        gaps=gaps,
    )


async def _server_time(client: AsyncRedis | RedisCluster) -> tuple[int, int]:
    if isinstance(client, RedisCluster):  # any node: their clocks are one host's here or NTP's
        reply: Any = await client.time(target_nodes=RedisCluster.RANDOM)
    else:
        reply = await client.time()
    seconds, micros = reply
    return int(seconds), int(micros)


def _owner(lease: Any) -> str | None:
    """The consumer name of a lease value ``<consumer> <token>``."""
    if not isinstance(lease, bytes):
        return None
    return lease.decode("utf-8", "replace").split(" ", 1)[0]


def _statuses(raw: Any) -> dict[str, LinkStatus]:
    if isinstance(raw, Exception):
        raise raw
    statuses: dict[str, LinkStatus] = {}
    for origin, value in raw.items():
        try:
            statuses[origin.decode()] = status_decoder.decode(value)
        except (msgspec.DecodeError, UnicodeDecodeError):
            continue
    return statuses


def backlogs(groups: Any, stream_info: Any) -> dict[str, int | None]:
    """Group name → entries not yet acknowledged (pending + not yet read), from stream IDs
    (:func:`invalgw.trim.unread`), not ``XINFO GROUPS`` lag, which Redis 7.0 leaves wrong after
    an AOF rewrite and restart.

    ``None`` when only a count could tell how many entries are left to read.
    """
    if isinstance(groups, redis.ResponseError):
        return {}  # no such stream yet
    if isinstance(groups, Exception):
        raise groups
    if not isinstance(stream_info, dict):
        return {}
    state = StreamState.parse(stream_info)
    found: dict[str, int | None] = {}
    for raw in groups:
        group = GroupPosition.parse(raw)
        left = unread(group, state)
        found[group.name] = None if left is None else group.pending + left
    return found
