"""Partitioned streams: which partition, hence which stream, an invalidation goes to.

A region's stream may be split into ``P`` partitions (``[streams] partitions``), each its own
stream with its own hash tag so a Redis Cluster spreads them over its shards. Every producer picks
the partition from the invalidation's first key (or its pattern) with :func:`partition_of`, so all
invalidations of one key land in one partition, in the order they were written.

The rule, in one line: the CRC32 (IEEE, as ``zlib.crc32``) of the key's hash tag if it has one (the
Redis Cluster rule: the text between the first ``{`` and the first ``}`` after it, if not empty),
else of the whole key, modulo ``P``. Partition ``p`` of stream ``S`` is the stream ``{S:p}``; with
``P = 1`` it is ``S`` itself.
"""

from __future__ import annotations

import zlib

from invalgw.proto.entry import WILDCARDS

_WILDCARDS = [char.encode() for char in WILDCARDS]
MAX_PARTITIONS = 1024
"""Most partitions a stream may have: far beyond any need (one partition can keep a Redis core
busy)."""


def _bytes(key: str | bytes) -> bytes:
    return key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key


def hash_tag(key: str | bytes) -> bytes:
    """The part of ``key`` Redis Cluster hashes: its hash tag if it has a non-empty one, else
    the whole key."""
    raw = _bytes(key)
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            return raw[start + 1 : end]
    return raw


def _check(partitions: int) -> None:
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be between 1 and {MAX_PARTITIONS}, not {partitions}")


def partition_of(key: str | bytes, partitions: int) -> int:
    """The partition of ``key`` among ``partitions``: CRC32 of its hash tag (or of the key), mod
    ``partitions``."""
    _check(partitions)
    return zlib.crc32(hash_tag(key)) % partitions


def pattern_partition(pattern: str | bytes, partitions: int) -> int:
    """The partition of a pattern invalidation: by its hash tag when the tag is literal (no
    wildcard in it), else by its literal prefix (the text before the first wildcard; partition 0
    when the pattern starts with one)."""
    _check(partitions)
    raw = _bytes(pattern)
    tag = hash_tag(raw)
    if tag != raw and not any(char in tag for char in _WILDCARDS):
        return zlib.crc32(tag) % partitions
    cut = min((i for i in (raw.find(w) for w in _WILDCARDS) if i >= 0), default=len(raw))
    return zlib.crc32(raw[:cut]) % partitions


def partition_stream(stream: str, partition: int, partitions: int) -> str:
    """The name of partition ``partition`` of ``stream``: ``stream`` itself when the stream is
    not partitioned, else ``{stream:partition}`` (a hash tag of its own)."""
    if partitions == 1:
        return stream
    if not 0 <= partition < partitions:
        raise ValueError(f"partition {partition} is not below {partitions}")
    return f"{{{stream}:{partition}}}"


def stream_for(
    stream: str,
    partitions: int,
    keys: list[str] | tuple[str, ...] = (),
    pattern: str | None = None,
) -> str:
    """The stream an invalidation of ``keys`` (by the first) or of ``pattern`` goes to."""
    if partitions == 1:
        return stream
    if keys:
        return partition_stream(stream, partition_of(keys[0], partitions), partitions)
    if pattern:
        return partition_stream(stream, pattern_partition(pattern, partitions), partitions)
    raise ValueError("an invalidation needs keys or a pattern")
