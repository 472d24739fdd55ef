"""Conflation: a key invalidated several times in one batch is applied and sent once.

The occurrence kept is the one with the strongest effect: ``unlink`` over ``hybrid`` (unlink in
the writer's region, expire elsewhere) over ``expire``; among those, the highest ``version``, then
the latest. It must also carry the highest version of the key in the batch (a fenced key's
tombstone keeps the highest version). The key is dropped from the other invalidations of the
batch (an invalidation left without keys is dropped), so different keys keep their order.
Where the strongest effect cannot be told in advance (``invalidate``, decided by each region's
policy, mixed with ``expire`` or ``hybrid``; versioned mixed with unversioned), every occurrence
stays.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from invalgw.proto import Invalidation

_STRENGTH = {"expire": 0, "hybrid": 1, "unlink": 2}


def conflate(events: Sequence[Invalidation]) -> tuple[list[Invalidation], int]:
    """``events`` with each key kept once where that is safe; and how many occurrences went."""
    keys = [key for event in events for key in event.keys]
    if len(set(keys)) == len(keys):  # the usual case, checked in C
        return list(events), 0
    occurrences: dict[str, list[int]] = {}
    for index, event in enumerate(events):
        for key in event.keys:
            occurrences.setdefault(key, []).append(index)
    drop: dict[int, set[str]] = {}
    for key, where in occurrences.items():
        if len(where) > 1 and (keep := _strongest(events, where)) is not None:
            for index in where:
                if index != keep:
                    drop.setdefault(index, set()).add(key)
    return _without(events, drop)


def _strongest(events: Sequence[Invalidation], where: list[int]) -> int | None:
    """The occurrence (index into ``events``) whose effect covers all of ``where``, if any."""
    ops = {events[index].op for index in where}
    if "unlink" in ops:
        ops = {"unlink"}
    elif not (len(ops) == 1 or ops <= _STRENGTH.keys()):
        return None
    versions = {events[index].version is None for index in where}
    if len(versions) > 1:
        return None

    def version(index: int) -> int:
        text = events[index].version
        return int(text) if text is not None else 0

    keep = max(where, key=lambda index: (_STRENGTH.get(events[index].op, 0), version(index), index))
    if version(keep) < max(version(index) for index in where):
        return None  # the strongest effect and the highest version are not in one occurrence
    return keep


def _without(
    events: Sequence[Invalidation], drop: dict[int, set[str]]
) -> tuple[list[Invalidation], int]:
    kept: list[Invalidation] = []
    dropped = 0
    for index, event in enumerate(events):
        gone = drop.get(index)
        if not gone:
            kept.append(event)
            continue
        keys = [key for key in event.keys if key not in gone]
        dropped += len(event.keys) - len(keys)
        if keys:
            kept.append(msgspec.structs.replace(event, keys=keys))
    return kept, dropped
