"""The lag table: for every origin → region pair, how invalidations are arriving, read from Redis.

Everything here comes from the regions' Redis servers, not from the gateways, so the table works
with any gateway stopped: each region's ``<namespace>:status`` hash (written by its gateway), the
consumer groups of each local stream (what is not yet delivered) and of each mirror stream (what
is delivered but not yet applied), and the dead-letter and gap streams; of a partitioned region,
those of every partition (see :mod:`invalgw.ops.lagread`), summed per pair or, with
``partitions``, a row per partition and its owner. ``invalgw demo`` shows it
live; :func:`render_text` and :func:`render_json` are what a command-line view prints.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import anyio
import msgspec
import redis
from redis.asyncio.cluster import RedisCluster

from invalgw.config import RedisEndpoint, RegionConfig
from invalgw.connections import REDIS_ERRORS, AsyncRedis, close, connect_cache
from invalgw.lag import LinkStatus
from invalgw.names import APPLY_GROUP, Names, forward_group
from invalgw.ops.lagread import MirrorPlace, RegionReading, mirror_places, read_region

STALE_MS = 3000.0
"""A region whose gateway has not written its status for this long is not running."""
SILENT_MS = 3000.0
"""A link whose newest envelope is this old is silent: the origin's gateway or the WAN is down."""
BEHIND_ENTRIES = 1000
"""Entries not yet delivered (or envelopes not yet applied) above which a link is behind."""
BEHIND_MS = 1000.0
"""Lag p99 above which a link is catching up (applying entries written a while ago)."""
RATE_WINDOW_S = 3.0
"""Rates are averaged over this many seconds of snapshots, so batching does not make them jump."""


class LinkRow(msgspec.Struct, kw_only=True):
    """How invalidations from ``origin`` arrive in ``region`` (``origin == region``: local)."""

    origin: str
    region: str
    state: str
    """ok, behind, catch-up, silent, stale, waiting or unknown (see :func:`link_state`)."""
    applied: int | None = None
    """Invalidations from origin applied in region, as counted by region's gateway."""
    applied_per_s: float | None = None
    lag_p50_ms: float | None = None
    lag_p99_ms: float | None = None
    backlog: int | None = None
    """Entries of origin's stream not yet delivered to region (not yet applied, for local)."""
    mirror_backlog: int | None = None
    """Envelopes delivered into region's mirror of origin but not yet applied (None for local)."""
    heartbeat_age_ms: float | None = None
    """How long ago origin sent the newest envelope region has applied (None for local)."""
    status_age_ms: float | None = None
    """How long ago region's gateway last wrote its status."""
    last_id: str | None = None
    """Origin stream ID of the last invalidation applied in region."""
    partition: int | None = None
    """On a row of one partition: the origin's partition (None on a pair's row, which sums or
    takes the worst of its partitions)."""
    owner: str | None = None
    """On a row of one partition: the gateway process (consumer name) holding the lease of the
    region's partition that applies it."""


class RegionRow(msgspec.Struct, kw_only=True):
    region: str
    redis: str
    """host:port of the region's Redis (no credentials)."""
    reachable: bool
    error: str | None = None
    written_per_s: float | None = None
    """Invalidations producers added to the region's local stream, per second."""
    stream_length: int | None = None
    dead_letters: int | None = None
    gaps: int | None = None


class Snapshot(msgspec.Struct, kw_only=True):
    taken_at: float
    """Unix time of the snapshot (this host's clock)."""
    links: list[LinkRow]
    regions: list[RegionRow]
    partitions: list[LinkRow] = []
    """With ``partitions=True``: a row per partition of every pair whose origin is partitioned."""


@dataclass(frozen=True)
class RegionTarget:
    """What the table reads of one region: its Redis, its key names, the peers it sends to."""

    name: str
    endpoint: RedisEndpoint
    names: Names
    peers: tuple[str, ...]
    partitions: int = 1
    mirrors: tuple[MirrorPlace, ...] = ()
    """The mirror streams the region applies (one per partition of a partitioned peer)."""

    @classmethod
    def from_config(cls, config: RegionConfig) -> RegionTarget:
        count = config.streams.partitions
        return cls(
            name=config.region,
            endpoint=config.redis,
            names=Names(config.streams.namespace, config.streams.local),
            peers=tuple(peer.name for peer in config.peers),
            partitions=count,
            mirrors=tuple(
                mirror_places([(peer.name, peer.partitions) for peer in config.peers], count)
            ),
        )


@dataclass
class _History:
    """Counter values of recent snapshots, to turn them into rates."""

    samples: deque[tuple[float, dict[str, int]]] = field(default_factory=deque)

    def rates(self, now: float, counters: dict[str, int]) -> dict[str, float]:
        self.samples.append((now, counters))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        then, old = self.samples[0]
        if now - then <= 0:
            return {}
        return {
            name: (value - old[name]) / (now - then)
            for name, value in counters.items()
            if name in old and value >= old[name]
        }


class LagCollector:
    """Reads every region's Redis and builds :class:`Snapshot` s; keep one to get rates."""

    TIMEOUT_MS = 1000

    def __init__(self, targets: Sequence[RegionTarget], *, partitions: bool = False) -> None:
        self.targets = list(targets)
        self.partitions = partitions
        """Add a row per partition (:attr:`Snapshot.partitions`)."""
        self._clients: dict[str, AsyncRedis | RedisCluster] = {}
        self._history = _History()
        self._previous: dict[tuple[str, str, int | None], LinkRow] = {}

    @classmethod
    def from_configs(
        cls, configs: Sequence[RegionConfig], *, partitions: bool = False
    ) -> LagCollector:
        return cls([RegionTarget.from_config(config) for config in configs], partitions=partitions)

    async def __aenter__(self) -> LagCollector:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await close(client)
        self._clients.clear()

    def _client(self, target: RegionTarget) -> AsyncRedis | RedisCluster:
        if target.name not in self._clients:
            # A table that refreshes every second must not hang on a dead region: short
            # timeouts, no retries; the next refresh is the retry.
            endpoint = msgspec.structs.replace(
                target.endpoint,
                socket_timeout_ms=min(target.endpoint.socket_timeout_ms, self.TIMEOUT_MS),
                connect_timeout_ms=min(target.endpoint.connect_timeout_ms, self.TIMEOUT_MS),
                retries=0,
            )
            name = f"invalgw:{target.name}:lag"
            self._clients[target.name] = connect_cache(endpoint, name=name)
        return self._clients[target.name]

    async def collect(self) -> Snapshot:
        readings: dict[str, RegionReading | Exception] = {}

        async def read(target: RegionTarget) -> None:
            client = self._client(target)
            try:
                readings[target.name] = await read_region(
                    client, target.names, target.partitions, target.mirrors
                )
            except REDIS_ERRORS as exc:
                readings[target.name] = exc

        async with anyio.create_task_group() as tg:
            for target in self.targets:
                tg.start_soon(read, target)
        now = time.time()
        counters = _counters(readings)
        rates = self._history.rates(time.monotonic(), counters)
        regions = [self._region_row(t, readings[t.name], rates) for t in self.targets]
        links = [
            self._link_row(origin, region, readings, rates)
            for origin in self.targets
            for region in self._receivers(origin)
        ]
        parts = [
            self._link_row(origin, region, readings, rates, partition=p)
            for origin in self.targets
            if self.partitions and origin.partitions > 1
            for region in self._receivers(origin)
            for p in range(origin.partitions)
        ]
        self._previous = {(row.origin, row.region, row.partition): row for row in links + parts}
        return Snapshot(taken_at=now, links=links, regions=regions, partitions=parts)

    def _receivers(self, origin: RegionTarget) -> list[RegionTarget]:
        """The region itself first, then the peers it forwards to, in target order."""
        return [origin] + [t for t in self.targets if t.name in origin.peers]

    def _region_row(
        self, target: RegionTarget, reading: RegionReading | Exception, rates: dict[str, float]
    ) -> RegionRow:
        address = _address(target.endpoint.url)
        if isinstance(reading, Exception):
            return RegionRow(
                region=target.name, redis=address, reachable=False, error=_error(reading)
            )
        return RegionRow(
            region=target.name,
            redis=address,
            reachable=True,
            written_per_s=rates.get(f"written:{target.name}"),
            stream_length=reading.stream_length,
            dead_letters=reading.dead_letters,
            gaps=reading.gaps,
        )

    def _link_row(
        self,
        origin: RegionTarget,
        region: RegionTarget,
        readings: Mapping[str, RegionReading | Exception],
        rates: dict[str, float],
        *,
        partition: int | None = None,
    ) -> LinkRow:
        """The row of a pair (summed or worst over its partitions), or of one of its origin's
        partitions."""
        local = origin.name == region.name
        row = LinkRow(origin=origin.name, region=region.name, state="", partition=partition)
        source = readings[origin.name]
        group = APPLY_GROUP if local else forward_group(region.name)
        if not isinstance(source, Exception):
            if partition is None:
                row.backlog = source.backlog(group)
            elif partition < len(source.parts):
                part = source.parts[partition]
                row.backlog = part.groups.get(group, part.stream_length)
        reading = readings[region.name]
        key = f"{origin.name}:{region.name}" + ("" if partition is None else f":{partition}")
        if isinstance(reading, Exception):
            row.state = "unknown"  # the region's Redis did not answer
            return row
        if partition is None:
            statuses = reading.statuses.get(origin.name, [])
            row.mirror_backlog = None if local else reading.mirror_backlog(origin.name)
        elif local:
            part = reading.parts[partition]
            statuses, row.owner = _present(part.statuses.get(origin.name)), part.owner
        else:
            statuses = []
            for mirror in reading.mirrors:
                if (mirror.place.origin, mirror.place.partition) == (origin.name, partition):
                    statuses, row.owner = _present(mirror.status), mirror.owner
                    row.mirror_backlog = mirror.backlog
        if statuses:
            row.applied_per_s = rates.get(f"applied:{key}")
            _fill_status(row, statuses, reading.now_ms, local=local)
        row.state = link_state(row, self._previous.get((origin.name, region.name, partition)))
        return row


def _present(status: LinkStatus | None) -> list[LinkStatus]:
    return [] if status is None else [status]


def _fill_status(row: LinkRow, statuses: list[LinkStatus], now_ms: float, *, local: bool) -> None:
    """What the region's gateway reported, over one or more partitions: applied summed, lag the
    worst partition's, status and heartbeat ages the oldest."""
    row.applied = sum(status.applied for status in statuses)
    p50 = [s.lag_p50_ms for s in statuses if s.lag_p50_ms is not None]
    p99 = [s.lag_p99_ms for s in statuses if s.lag_p99_ms is not None]
    row.lag_p50_ms, row.lag_p99_ms = max(p50, default=None), max(p99, default=None)
    row.last_id = max((s.last_id for s in statuses), key=_id_order)
    updated = [s.updated_ms for s in statuses if s.updated_ms]
    if updated:
        row.status_age_ms = max(0.0, now_ms - min(updated))
    beats = [now_ms + s.origin_clock_offset_ms - s.heartbeat_ms for s in statuses if s.heartbeat_ms]
    if beats and not local:
        row.heartbeat_age_ms = max(0.0, max(beats))


def _id_order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def link_state(row: LinkRow, previous: LinkRow | None) -> str:
    """One word an operator can act on.

    - ``unknown``: the region's Redis did not answer;
    - ``waiting``: the region's gateway has not reported on this origin yet, or nothing ever
      arrived from the origin (a gateway not started yet);
    - ``stale``: the region's gateway stopped reporting (it is not running): start it;
    - ``silent``: nothing arrives from the origin: its gateway or the link to it is down;
    - ``behind``: a backlog is building up; ``catch-up``: it is shrinking, or the region is
      applying invalidations written a while ago;
    - ``ok``: none of the above.
    """
    local = row.origin == row.region
    if row.status_age_ms is None or (row.heartbeat_age_ms is None and not local):
        return "waiting"
    if row.status_age_ms > STALE_MS:
        return "stale"
    if row.heartbeat_age_ms is not None and row.heartbeat_age_ms > SILENT_MS:
        return "silent"
    waiting = max(row.backlog or 0, row.mirror_backlog or 0)
    if waiting > BEHIND_ENTRIES:
        if previous is not None and waiting < max(
            previous.backlog or 0, previous.mirror_backlog or 0
        ):
            return "catch-up"
        return "behind"
    if row.lag_p99_ms is not None and row.lag_p99_ms > BEHIND_MS:
        return "catch-up"
    return "ok"


def _counters(readings: Mapping[str, RegionReading | Exception]) -> dict[str, int]:
    counters: dict[str, int] = {}
    for region, reading in readings.items():
        if isinstance(reading, Exception):
            continue
        if reading.entries_added is not None:
            counters[f"written:{region}"] = reading.entries_added
        for origin, statuses in reading.statuses.items():
            counters[f"applied:{origin}:{region}"] = sum(s.applied for s in statuses)
        for part in reading.parts:
            status = part.statuses.get(region)
            if part.partition is not None and status is not None:
                counters[f"applied:{region}:{region}:{part.partition}"] = status.applied
        for mirror in reading.mirrors:
            place = mirror.place
            if place.partition is not None and mirror.status is not None:
                counters[f"applied:{place.origin}:{region}:{place.partition}"] = (
                    mirror.status.applied
                )
    return counters


def _address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else url


# Text rendering ---------------------------------------------------------------------------

RESET = "\x1b[0m"
STYLES = {
    "ok": "\x1b[32m",
    "catch-up": "\x1b[33m",
    "behind": "\x1b[33m",
    "waiting": "\x1b[2m",
    "silent": "\x1b[31m",
    "stale": "\x1b[31m",
    "unknown": "\x1b[31m",
    "header": "\x1b[1m",
    "dim": "\x1b[2m",
}
STATES = ("ok", "behind", "catch-up", "silent", "stale", "waiting", "unknown")
DASH = "-"
SEPARATOR = "  "


@dataclass(frozen=True)
class Column:
    header: str
    align: str = ">"
    """``"<"`` left, ``">"`` right (numbers)."""
    width: int = 0
    """At least this wide, so the table does not shift when values change."""
    optional: bool = False
    """Left out when the table is wider than the screen."""


LINK_COLUMNS = (
    Column("ORIGIN → REGION", "<"),
    Column("STATE", "<", width=max(map(len, STATES))),
    Column("APPLIED/S"),
    Column("LAG P50", width=7),
    Column("LAG P99", width=7),
    Column("BACKLOG"),
    Column("MIRROR", optional=True),
    Column("HEARTBEAT"),
)
REGION_COLUMNS = (
    Column("WRITTEN/S"),
    Column("STREAM"),
    Column("DEAD LETTERS"),
    Column("GAPS"),
)


def render_text(
    snapshot: Snapshot,
    *,
    color: bool = False,
    width: int | None = None,
    region_columns: Sequence[tuple[Column, Mapping[str, str]]] = (),
) -> list[str]:
    """The table as lines of text (ANSI colours when ``color``), without line ends.

    With ``width``, optional columns are left out if the lines would be wider.
    ``region_columns`` adds columns to the per-region table, after REGION.
    """
    owners = bool(snapshot.partitions)
    link_rows: list[list[str] | None] = []
    for i, row in enumerate(snapshot.links):
        if i and row.origin != snapshot.links[i - 1].origin:
            link_rows.append(None)  # a blank line between origins
        link_rows.append(_link_cells(row) + ([""] if owners else []))
        link_rows.extend(  # its partitions under it, with their owners
            [*_link_cells(part), part.owner or DASH]
            for part in snapshot.partitions
            if (part.origin, part.region) == (row.origin, row.region)
        )
    link_columns = LINK_COLUMNS + ((Column("OWNER", "<"),) if owners else ())
    lines = _table(link_columns, link_rows, color=color, width=width, state_column=1)
    columns = (Column("REGION", "<"), *(column for column, _ in region_columns), *REGION_COLUMNS)
    region_rows: list[list[str] | None] = []
    for region in snapshot.regions:
        cells = [region.region, *(values.get(region.region, DASH) for _, values in region_columns)]
        if region.reachable:
            cells += [
                _rate(region.written_per_s),
                _count(region.stream_length),
                _count(region.dead_letters),
                _count(region.gaps),
            ]
        else:
            failed = region.error is not None and region.error.startswith(AUTH_FAILED)
            cells += ["auth failed" if failed else "unreachable", "", "", ""]
        region_rows.append(cells)
    lines.append("")
    lines += _table(columns, region_rows, color=color, width=width, state_column=None)
    return lines


AUTH_FAILED = "authentication failed"


def _error(reading: Exception) -> str | None:
    """What kept a region's Redis from answering, for people; a refused credential says so."""
    if isinstance(reading, redis.AuthenticationError):
        return f"{AUTH_FAILED}: {reading}"
    return str(reading) or None


def _link_cells(row: LinkRow) -> list[str]:
    local = row.origin == row.region
    stale = row.state in ("stale", "unknown")
    pair = f"{row.origin} → {row.region}"
    return [
        pair if row.partition is None else f"  partition {row.partition}",
        row.state,
        _rate(row.applied_per_s),
        DASH if stale else _duration(row.lag_p50_ms),
        DASH if stale else _duration(row.lag_p99_ms),
        _count(row.backlog),
        "" if local else _count(row.mirror_backlog),
        "" if local else _duration(row.heartbeat_age_ms),
    ]


def _table(
    columns: Sequence[Column],
    rows: Sequence[list[str] | None],
    *,
    color: bool,
    width: int | None,
    state_column: int | None,
) -> list[str]:
    widths = [max(len(column.header), column.width) for column in columns]
    for cells in rows:
        for i, cell in enumerate(cells or ()):
            widths[i] = max(widths[i], len(cell))
    shown = list(range(len(columns)))
    total = sum(widths) + len(SEPARATOR) * (len(widths) - 1)
    for i in reversed(range(len(columns))):
        if width is not None and total > width and columns[i].optional:
            shown.remove(i)
            total -= widths[i] + len(SEPARATOR)

    def line(cells: Sequence[str]) -> str:
        out = []
        for i in shown:
            text = f"{cells[i]:{columns[i].align}{widths[i]}}"
            code = STYLES.get(cells[i]) if color and i == state_column else None
            out.append(code + text + RESET if code else text)
        return SEPARATOR.join(out).rstrip()

    header = line([column.header for column in columns])
    lines = [STYLES["header"] + header + RESET if color else header]
    lines += ["" if cells is None else line(cells) for cells in rows]
    return lines


def _rate(value: float | None) -> str:
    return DASH if value is None else f"{value:,.0f}"


def _count(value: int | None) -> str:
    return DASH if value is None else f"{value:,}"


def _duration(ms: float | None) -> str:
    if ms is None:
        return DASH
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    return f"{ms / 60_000:.1f} min"


def render_json(snapshot: Snapshot) -> bytes:
    return msgspec.json.encode(snapshot)
