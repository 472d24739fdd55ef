"""``invalgw lag --check``: which origin → region pairs are unhealthy, for scripts and probes.

A condition is a link state (``stale``, ``silent``…) or a bound: ``backlog>N`` (entries not yet
delivered or applied), ``lag>S`` (lag p99, seconds), ``heartbeat>S`` (seconds since the origin's
newest envelope). A pair is unhealthy when any condition holds; an unreachable region's pairs are
``unknown``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from invalgw.ops.lagtable import STATES, LinkRow, Snapshot

DEFAULT_FAIL_ON = "unknown,waiting,stale,silent,behind"
"""What ``--check`` alone fails on: a pair that is not flowing, or not keeping up."""
BOUNDS = ("backlog", "lag", "heartbeat")


@dataclass(frozen=True)
class Condition:
    """A link state, or ``measure > limit``."""

    state: str | None = None
    measure: str | None = None
    limit: float = 0.0

    def __str__(self) -> str:
        return self.state if self.state is not None else f"{self.measure}>{self.limit:g}"

    def holds(self, row: LinkRow) -> str | None:
        """Why ``row`` is unhealthy under this condition; None if it is not."""
        if self.state is not None:
            return row.state if row.state == self.state else None
        value = _measure(row, self.measure or "")
        if value is None or value <= self.limit:
            return None
        unit = "" if self.measure == "backlog" else " s"
        return f"{self.measure} {value:g}{unit} > {self.limit:g}{unit}"


def _measure(row: LinkRow, name: str) -> float | None:
    if name == "backlog":
        waiting = [value for value in (row.backlog, row.mirror_backlog) if value is not None]
        return float(max(waiting)) if waiting else None
    milliseconds = row.lag_p99_ms if name == "lag" else row.heartbeat_age_ms
    return None if milliseconds is None else round(milliseconds / 1000, 3)


def parse_conditions(text: str) -> tuple[Condition, ...]:
    """``stale,silent,backlog>1000,lag>5``; raises ValueError naming what is wrong."""
    conditions = []
    for word in (part.strip() for part in text.split(",")):
        if not word:
            continue
        if ">" not in word:
            if word not in STATES:
                raise ValueError(f"unknown state {word!r}; states: {', '.join(STATES)}")
            conditions.append(Condition(state=word))
            continue
        measure, _, limit = word.partition(">")
        if measure.strip() not in BOUNDS:
            raise ValueError(f"unknown measure {measure!r}; measures: {', '.join(BOUNDS)}")
        try:
            conditions.append(Condition(measure=measure.strip(), limit=float(limit)))
        except ValueError:
            raise ValueError(f"{word!r}: {limit!r} is not a number") from None
    if not conditions:
        raise ValueError("no condition given")
    return tuple(conditions)


class Problem(msgspec.Struct, kw_only=True):
    origin: str
    region: str
    partition: int | None = None
    """Set on a problem of one partition of the origin's stream (``--partitions``)."""
    state: str
    reasons: list[str]

    def line(self) -> str:
        where = "" if self.partition is None else f" partition {self.partition}"
        return f"{self.origin} → {self.region}{where}: {'; '.join(self.reasons)}"


def problems(snapshot: Snapshot, conditions: Sequence[Condition]) -> list[Problem]:
    """Every pair of ``snapshot`` for which a condition holds, with the reasons."""
    found = []
    for row in snapshot.links + snapshot.partitions:
        reasons = [reason for c in conditions if (reason := c.holds(row)) is not None]
        if reasons:
            found.append(
                Problem(
                    origin=row.origin,
                    region=row.region,
                    partition=row.partition,
                    state=row.state,
                    reasons=reasons,
                )
            )
    return found


class CheckReport(msgspec.Struct, kw_only=True):
    ok: bool
    fail_on: list[str]
    unhealthy: list[Problem]
