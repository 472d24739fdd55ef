"""Partitioned streams: the producer rule and the names of each partition's keys. Pure logic."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from invalgw.config import RedisEndpoint, RegionConfig, Streams
from invalgw.names import Names
from invalgw.proto import (
    hash_tag,
    partition_of,
    partition_stream,
    pattern_partition,
    stream_for,
)


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        ("user:1001", b"user:1001"),
        ("{user:1001}:profile", b"user:1001"),
        ("a{b}c{d}", b"b"),
        ("a{}b", b"a{}b"),  # an empty tag does not count: the whole key is hashed
        ("a{b", b"a{b"),
        ("a}b{c}", b"c"),
        (b"\xff{\xfe}", b"\xfe"),
    ],
)
def test_hash_tag_follows_redis_cluster(key: str | bytes, tag: bytes) -> None:
    assert hash_tag(key) == tag


def test_partition_is_crc32_of_the_tag_mod_p() -> None:
    assert partition_of("user:1001", 8) == zlib.crc32(b"user:1001") % 8
    assert partition_of("{user:1001}:profile", 8) == zlib.crc32(b"user:1001") % 8
    assert partition_of("{user:1001}:profile", 8) == partition_of("{user:1001}:cart", 8)
    assert partition_of("anything", 1) == 0
    # the worked example of proto/README.md, which every language's recipe must reproduce
    assert zlib.crc32(b"user:1001") == 3899860853
    assert partition_of("user:1001", 8) == 5


@given(st.binary(max_size=40), st.integers(min_value=1, max_value=1024))
def test_partition_is_in_range_and_bytes_equal_text(key: bytes, partitions: int) -> None:
    p = partition_of(key, partitions)
    assert 0 <= p < partitions
    text = key.decode("utf-8", "surrogateescape")
    assert partition_of(text, partitions) == p


@pytest.mark.parametrize("partitions", [0, 1025])
def test_partition_count_out_of_range_is_refused(partitions: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 1024"):
        partition_of("k", partitions)


def test_pattern_goes_by_its_literal_tag_else_its_prefix() -> None:
    assert pattern_partition("{user:1001}:*", 8) == partition_of("{user:1001}:profile", 8)
    assert pattern_partition("user:1001:*", 8) == zlib.crc32(b"user:1001:") % 8
    # a wildcard in the tag: by the prefix before it, braces included
    assert pattern_partition("{user:*}:x", 8) == zlib.crc32(b"{user:") % 8
    assert pattern_partition("*", 8) == 0
    assert pattern_partition("user:1001", 8) == partition_of("user:1001", 8)


def test_stream_of_each_partition() -> None:
    assert partition_stream("invalidations", 0, 1) == "invalidations"
    assert partition_stream("invalidations", 3, 8) == "{invalidations:3}"
    assert stream_for("invalidations", 1, ["k"]) == "invalidations"
    p = partition_of("{user:1}:a", 8)
    assert stream_for("invalidations", 8, ["{user:1}:a", "other"]) == f"{{invalidations:{p}}}"
    with pytest.raises(ValueError, match="not below"):
        partition_stream("invalidations", 8, 8)


def test_one_partition_keeps_the_unpartitioned_names() -> None:
    names = Names("invalgw", "invalidations")
    assert names.partition(0, 1) is names
    assert names.keys(["eu-west"]) == [
        "invalidations",
        "invalgw:status",
        "invalgw:epoch",
        "invalgw:lease",
        "invalgw:lost",
        "invalgw:dead",
        "invalgw:gaps",
        "invalgw:link:eu-west",
    ]
    assert names.mirror("eu-west") == "invalgw:mirror:{eu-west}"
    assert names.mirror_state("eu-west") == "invalgw:mirror:{eu-west}:state"


def test_every_key_of_a_partition_is_in_its_slot() -> None:
    names = Names("invalgw", "invalidations")
    slots = set()
    for p in range(8):
        part = names.partition(p, 8)
        assert part.local_stream == f"{{invalidations:{p}}}"
        assert part.status == f"invalgw:status:{{invalidations:{p}}}"
        keys = part.keys(["eu-west", "ap-south"])
        assert len({key_slot(key.encode()) for key in keys}) == 1, keys
        slots.add(key_slot(part.local_stream.encode()))
        mirror = [names.mirror("us-east", p), names.mirror_state("us-east", p)]
        assert mirror[0] == f"invalgw:mirror:{{us-east:{p}}}"
        assert len({key_slot(key.encode()) for key in mirror}) == 1
    assert len(slots) == 8  # spread over the cluster's slots


def test_producers_cannot_target_any_partition() -> None:
    config = RegionConfig(
        region="us-east", redis=RedisEndpoint(url="redis://h"), streams=Streams(partitions=4)
    )
    assert config.local_streams == [f"{{invalidations:{p}}}" for p in range(4)]
    guard = config.guard
    assert set(guard.names) == set(config.local_streams)
