"""``invalgw check`` across region files: does a region's ``[[peers]] partitions`` match the
peer's own ``[streams] partitions``?

A gateway reads the mirror streams of a peer by the partitions its own config names for it
(``<namespace>:mirror:{<peer>:<q>}``); the peer writes them by its own ``[streams] partitions``.
When the two differ, the peer delivers into streams nobody here reads (or this region waits on
streams that never come), and nothing fails loudly. Each region's file is checked on its own, so
the mismatch shows only with both files at hand: those given to ``check`` together, and
``<peer>.toml`` next to the file checked.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from invalgw.config import RegionConfig


@dataclass(frozen=True)
class RegionFile:
    """What a region's own file says of its stream: enough to compare, nothing more."""

    path: str
    region: str
    partitions: int


def given(path: str, config: RegionConfig) -> RegionFile:
    """A file given to ``check`` (loaded and validated already)."""
    return RegionFile(path, config.region, config.streams.partitions)


def beside(path: str, peer: str) -> RegionFile | None:
    """``<peer>.toml`` in the directory of ``path``, if it is there and is that peer's file.

    Read as plain TOML, without expanding ``${VAR}``: checking one region must not need the
    other regions' secrets. A file that does not read is not this check's business (``check``
    on that file says what is wrong with it)."""
    candidate = Path(path).parent / f"{peer}.toml"
    try:
        raw = tomllib.loads(candidate.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    streams = raw.get("streams", {})
    partitions = streams.get("partitions", 1) if isinstance(streams, dict) else None
    if raw.get("region") != peer or type(partitions) is not int:
        return None
    return RegionFile(str(candidate), peer, partitions)


def partition_mismatches(
    path: str, config: RegionConfig, together: Iterable[RegionFile] = ()
) -> list[str]:
    """One line per peer of ``config`` (read from ``path``) whose ``partitions`` differ from
    its own file's: a file in ``together`` (the files given with it), else ``<peer>.toml``
    beside ``path``. Each line names both files, the fields and both values."""
    by_region = {other.region: other for other in together if other.path != path}
    problems: list[str] = []
    for i, peer in enumerate(config.peers):
        own = by_region.get(peer.name) or beside(path, peer.name)
        if own is None or Path(own.path).resolve() == Path(path).resolve():
            continue
        if own.partitions != peer.partitions:
            problems.append(
                f"peers[{i}].partitions: {peer.partitions} for peer {peer.name!r}, but "
                f"{own.path} has [streams] partitions = {own.partitions}; they must match, or "
                f"the mirror streams of {peer.name} here are named for the wrong partitions"
            )
    return problems
