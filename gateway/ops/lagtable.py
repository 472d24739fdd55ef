"""The lag table: for every origin → region pair, how invalidations are arriving, read from Redis.

Everything here comes from the regions' Redis servers, not from the gateways, so the table works
with any gateway stopped: each region's ``<namespace>:status`` hash (written by its gateway), the
consumer groups of each local stream (what is not yet delivered) and of each mirror stream (what
is delivered but not yet applied), and the dead-letter and gap streams. ``invalgw demo`` shows it
live; :func:`render_text` and :func:`render_json` are what a command-line view prints.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import msgspec
import redis

from invalgw.config import RedisEndpoint, RegionConfig
from invalgw.connections import REDIS_ERRORS, AsyncRedis, close, connect
from invalgw.lag import LinkStatus, status_decoder
from invalgw.names import APPLY_GROUP, Names, forward_group
from invalgw.trim import GroupPosition, StreamState, unread

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


@dataclass(frozen=True)
class RegionTarget:
    """What the table reads of one region: its Redis, its key names, the peers it sends to."""

    name: str
    endpoint: RedisEndpoint
    names: Names
    peers: tuple[str, ...]

    @classmethod
    def from_config(cls, config: RegionConfig) -> RegionTarget:
        return cls(
            name=config.region,
            endpoint=config.redis,
            names=Names(config.streams.namespace, config.streams.local),
            peers=tuple(peer.name for peer in config.peers),
        )


@dataclass
class _RegionReading:
    """One region's raw replies from one round trip."""

    now_ms: float
    statuses: dict[str, LinkStatus]
    local_groups: dict[str, int | None]
    mirror_backlogs: dict[str, int | None]
    """Per origin: envelopes in its mirror stream here not yet applied."""
    entries_added: int | None
    stream_length: int
    dead_letters: int
    gaps: int


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

    def __init__(self, targets: Sequence[RegionTarget]) -> None:
        self.targets = list(targets)
        self._clients: dict[str, AsyncRedis] = {}
        self._history = _History()
        self._previous: dict[tuple[str, str], LinkRow] = {}

    @classmethod
    def from_configs(cls, configs: Sequence[RegionConfig]) -> LagCollector:
        return cls([RegionTarget.from_config(config) for config in configs])

    async def __aenter__(self) -> LagCollector:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await close(client)
        self._clients.clear()

    def _client(self, target: RegionTarget) -> AsyncRedis:
        if target.name not in self._clients:
            # A table that refreshes every second must not hang on a dead region: short
            # timeouts, no retries; the next refresh is the retry.
            endpoint = msgspec.structs.replace(
                target.endpoint,
                socket_timeout_ms=min(target.endpoint.socket_timeout_ms, self.TIMEOUT_MS),
                connect_timeout_ms=min(target.endpoint.connect_timeout_ms, self.TIMEOUT_MS),
                retries=0,
            )
            self._clients[target.name] = connect(endpoint, name=f"invalgw:{target.name}:lag")
        return self._clients[target.name]

    async def collect(self) -> Snapshot:
        readings: dict[str, _RegionReading | Exception] = {}

        async def read(target: RegionTarget) -> None:
            try:
                readings[target.name] = await _read_region(self._client(target), target)
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
        self._previous = {(row.origin, row.region): row for row in links}
        return Snapshot(taken_at=now, links=links, regions=regions)

    def _receivers(self, origin: RegionTarget) -> list[RegionTarget]:
        """The region itself first, then the peers it forwards to, in target order."""
        return [origin] + [t for t in self.targets if t.name in origin.peers]

    def _region_row(
        self, target: RegionTarget, reading: _RegionReading | Exception, rates: dict[str, float]
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
        readings: Mapping[str, _RegionReading | Exception],
        rates: dict[str, float],
    ) -> LinkRow:
        local = origin.name == region.name
        row = LinkRow(origin=origin.name, region=region.name, state="")
        source = readings[origin.name]
        if not isinstance(source, Exception):
            group = APPLY_GROUP if local else forward_group(region.name)
            # a group the gateway has not created yet has the whole stream ahead of it
            row.backlog = source.local_groups.get(group, source.stream_length)
        reading = readings[region.name]
        if isinstance(reading, Exception):
            row.state = "unknown"  # the region's Redis did not answer
            return row
        if not local:
            row.mirror_backlog = reading.mirror_backlogs.get(origin.name)
        status = reading.statuses.get(origin.name)
        if status is not None:
            row.applied = status.applied
            row.applied_per_s = rates.get(f"applied:{origin.name}:{region.name}")
            row.lag_p50_ms, row.lag_p99_ms = status.lag_p50_ms, status.lag_p99_ms
            row.last_id = status.last_id
            if status.updated_ms:
                row.status_age_ms = max(0.0, reading.now_ms - status.updated_ms)
            if status.heartbeat_ms and not local:
                origin_now_ms = reading.now_ms + status.origin_clock_offset_ms
                row.heartbeat_age_ms = max(0.0, origin_now_ms - status.heartbeat_ms)
        row.state = link_state(row, self._previous.get((origin.name, region.name)))
        return row


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


async def _read_region(client: AsyncRedis, target: RegionTarget) -> _RegionReading:
    names = target.names
    async with client.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.hgetall(names.status)
        pipe.xinfo_groups(names.local_stream)
        pipe.xinfo_stream(names.local_stream)
        pipe.xlen(names.dead_letters)
        pipe.xlen(names.gaps)
        for peer in target.peers:
            pipe.xinfo_groups(names.mirror(peer))
            pipe.xinfo_stream(names.mirror(peer))
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    (server_time, raw_statuses, local_groups, stream_info, dead, gaps, *mirrors) = replies
    for reply in (server_time, raw_statuses, dead, gaps):
        if isinstance(reply, Exception):
            raise reply
    statuses: dict[str, LinkStatus] = {}
    for origin, raw in raw_statuses.items():
        try:
            statuses[origin.decode()] = status_decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError):
            continue
    mirror_backlogs: dict[str, int | None] = {}
    for i, peer in enumerate(target.peers):
        groups, mirror_info = mirrors[2 * i : 2 * i + 2]
        length = int(mirror_info["length"]) if isinstance(mirror_info, dict) else 0
        mirror_backlogs[peer] = _backlogs(groups, mirror_info).get(APPLY_GROUP, length)
    info = stream_info if isinstance(stream_info, dict) else {}
    seconds, micros = server_time
    return _RegionReading(
        now_ms=seconds * 1000 + micros / 1000,
        statuses=statuses,
        local_groups=_backlogs(local_groups, stream_info),
        mirror_backlogs=mirror_backlogs,
        entries_added=info.get("entries-added"),
        stream_length=int(info.get("length", 0)),
        dead_letters=int(dead),
        gaps=int(gaps),
    )


def _backlogs(groups: Any, stream_info: Any) -> dict[str, int | None]:
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
    backlogs: dict[str, int | None] = {}
    for raw in groups:
        group = GroupPosition.parse(raw)
        left = unread(group, state)
        backlogs[group.name] = None if left is None else group.pending + left
    return backlogs


def _counters(readings: Mapping[str, _RegionReading | Exception]) -> dict[str, int]:
    counters: dict[str, int] = {}
    for region, reading in readings.items():
        if isinstance(reading, Exception):
            continue
        if reading.entries_added is not None:
            counters[f"written:{region}"] = reading.entries_added
        for origin, status in reading.statuses.items():
            counters[f"applied:{origin}:{region}"] = status.applied
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
    link_rows: list[list[str] | None] = []
    for i, row in enumerate(snapshot.links):
        if i and row.origin != snapshot.links[i - 1].origin:
            link_rows.append(None)  # a blank line between origins
        link_rows.append(_link_cells(row))
    lines = _table(LINK_COLUMNS, link_rows, color=color, width=width, state_column=1)
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
    return [
        f"{row.origin} → {row.region}",
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
