"""The public wire contract: producer entries, mirror envelopes, stream IDs, published schemas.

Pure logic, no Redis. Entries are given as Redis hands them to the gateway: bytes to bytes.
"""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from invalgw.proto import (
    Batch,
    Guard,
    Heartbeat,
    Invalidation,
    InvalidEntry,
    Limits,
    StreamId,
    check_invalidation,
    decode_envelope,
    encode_envelope,
    entry_fields,
    parse_entry,
    plainly_valid,
)
from invalgw.proto.envelope import ENVELOPE_FIELD
from invalgw.proto.schema import SCHEMA_DIR, render, schemas

LIMITS = Limits()


def raw(**fields: str | bytes) -> dict[bytes, bytes]:
    """Fields as XADD stored them (``bytes`` values are passed through as they are)."""
    return {
        name.encode(): value if isinstance(value, bytes) else value.encode()
        for name, value in fields.items()
    }


def as_stored(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {name.encode(): value.encode() for name, value in fields.items()}


def keys_of(keys: str, **fields: str) -> list[str]:
    return parse_entry("1-0", raw(op="unlink", keys=keys, **fields), LIMITS).keys


# --- parse_entry: valid entries -------------------------------------------------------------


def test_minimal_entry_is_an_unlink_of_its_keys() -> None:
    invalidation = parse_entry(
        "1700000000000-3", raw(op="unlink", keys="user:1001:profile user:1001:permissions"), LIMITS
    )
    assert invalidation == Invalidation(
        "1700000000000-3", "unlink", ["user:1001:profile", "user:1001:permissions"]
    )


def test_all_fields_are_carried() -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    invalidation = parse_entry(
        "5-0",
        raw(op="unlink", keys="a", v="1", sep=",", traceparent=traceparent, source="orders"),
        LIMITS,
    )
    assert invalidation.traceparent == traceparent
    assert invalidation.source == "orders"


def test_unknown_fields_are_ignored() -> None:
    """Producers may add fields (of a later minor version) before every gateway knows them."""
    fields = raw(op="unlink", keys="a b", priority="high", tenant="acme")
    assert parse_entry("1-0", fields, LIMITS).keys == ["a", "b"]


def test_empty_optional_fields_count_as_absent() -> None:
    invalidation = parse_entry("1-0", raw(op="unlink", keys="a", traceparent="", source=""), LIMITS)
    assert (invalidation.traceparent, invalidation.source) == (None, None)


# --- parse_entry: every way an entry can be invalid -----------------------------------------

INVALID = [
    pytest.param({}, "deleted", "entry has no fields (it was deleted or trimmed)", id="deleted"),
    pytest.param({"keys": "a"}, "missing_field", "missing field 'op'", id="no-op"),
    pytest.param({"op": "unlink"}, "no_keys", "'keys' (or 'pattern') is missing", id="no-keys"),
    pytest.param(
        {"op": "purge", "keys": "a"},
        "unknown_op",
        "unknown op 'purge'; known ops: unlink, expire, hybrid, invalidate",
        id="unknown-op",
    ),
    pytest.param(
        {"op": "unlink", "keys": "a", "pattern": "abc:*"},
        "keys_and_pattern",
        "give either 'keys' or 'pattern', not both",
        id="keys-and-pattern",
    ),
    pytest.param(
        {"op": "unlink", "pattern": "*"},
        "pattern_too_broad",
        "fixes 0 characters before its first wildcard; at least 3 are required",
        id="pattern-wipes-everything",
    ),
    pytest.param(
        {"op": "unlink", "pattern": "ab*"},
        "pattern_too_broad",
        "fixes 2 characters",
        id="pattern-prefix-too-short",
    ),
    pytest.param(
        {"op": "unlink", "pattern": "k" * 1025},
        "key_too_long",
        "pattern is 1025 bytes",
        id="pattern-too-long",
    ),
    pytest.param(
        {"op": "unlink", "keys": "a", "version": "-1"},
        "bad_fence_version",
        "version '-1' must be a non-negative integer",
        id="negative-fence-version",
    ),
    pytest.param(
        {"op": "unlink", "keys": "a", "version": "007"},
        "bad_fence_version",
        "without leading zeros",
        id="fence-version-leading-zero",
    ),
    pytest.param(
        {"op": "UNLINK", "keys": "a"}, "unknown_op", "unknown op 'UNLINK'", id="op-is-case-exact"
    ),
    pytest.param(
        {"op": "unlink", "keys": "a", "v": "2"},
        "bad_version",
        "unsupported contract version v='2'; this gateway reads v=1",
        id="newer-version",
    ),
    pytest.param({"op": "unlink", "keys": "a", "v": ""}, "bad_version", "v=''", id="empty-version"),
    pytest.param({"op": "unlink", "keys": ""}, "no_keys", "no keys: field 'keys'", id="empty"),
    pytest.param({"op": "unlink", "keys": " \t\n "}, "no_keys", "no keys", id="only-whitespace"),
    pytest.param(
        {"op": "unlink", "keys": "", "sep": ","}, "no_keys", "no keys", id="empty-with-sep"
    ),
    pytest.param(
        {"op": "unlink", "keys": "a,,b", "sep": ","},
        "empty_key",
        "empty key: 'keys' has two separators in a row or at an end",
        id="two-separators",
    ),
    pytest.param(
        {"op": "unlink", "keys": "a,b,", "sep": ","}, "empty_key", "empty key", id="trailing-sep"
    ),
    pytest.param(
        {"op": "unlink", "keys": " ".join(f"k{i}" for i in range(1001))},
        "too_many_keys",
        "1001 keys, over the limit of 1000 per entry",
        id="too-many-keys",
    ),
    pytest.param(
        {"op": "unlink", "keys": "x" * 1025},
        "key_too_long",
        "is 1025 bytes, over the limit of 1024",
        id="key-too-long",
    ),
    pytest.param(
        {"op": "unlink", "keys": "é" * 600},
        "key_too_long",
        "is 1200 bytes, over the limit of 1024",
        id="multibyte-key-too-long-in-bytes",
    ),
    pytest.param(
        {"op": "unlink", "keys": "k " * 40_000},
        "field_too_long",
        "field 'keys' is 80000 bytes, over the limit of 65536",
        id="field-too-long",
    ),
    pytest.param(
        {"op": "unlink", "keys": "a", "source": "x" * 70_000},
        "field_too_long",
        "field 'source' is 70000 bytes",
        id="unknown-sized-field-too-long",
    ),
    pytest.param(
        {"op": "unlink", "keys": b"caf\xe9"},
        "not_utf8",
        "field 'keys' is not UTF-8 text",
        id="latin1-value",
    ),
]


@pytest.mark.parametrize(("fields", "code", "reason"), INVALID)
def test_invalid_entry_names_code_and_reason(
    fields: dict[str, str | bytes], code: str, reason: str
) -> None:
    with pytest.raises(InvalidEntry) as caught:
        parse_entry("1-0", raw(**fields), LIMITS)
    assert caught.value.code == code
    assert reason in caught.value.reason
    assert "\n" not in caught.value.reason


def test_field_name_that_is_not_utf8_is_named_readably() -> None:
    fields = {b"op": b"unlink", b"keys": b"a", b"\xffname": b"x"}
    with pytest.raises(InvalidEntry, match=r"^field '\\xffname' is not UTF-8 text$") as caught:
        parse_entry("1-0", fields, LIMITS)
    assert caught.value.code == "not_utf8"


def test_limits_are_inclusive() -> None:
    limits = Limits(max_keys=3, max_key_bytes=4, max_field_bytes=14)
    at_every_limit = raw(op="unlink", keys="aaaa bbbb cccc")  # 3 keys, 4 bytes each, 14 bytes
    assert parse_entry("1-0", at_every_limit, limits).keys == ["aaaa", "bbbb", "cccc"]
    for keys, code in [("a b c d", "too_many_keys"), ("ééé", "key_too_long")]:
        with pytest.raises(InvalidEntry) as caught:
            parse_entry("1-0", raw(op="unlink", keys=keys), limits)
        assert caught.value.code == code
    with pytest.raises(InvalidEntry) as caught:
        parse_entry("1-0", raw(op="unlink", keys="aaaa bbbb cccc "), limits)
    assert caught.value.code == "field_too_long"


@pytest.mark.parametrize("name", ["max_keys", "max_key_bytes", "max_field_bytes"])
def test_limits_must_be_positive(name: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=f"{name}: must be positive"):
        msgspec.convert({name: 0}, Limits)


# --- key splitting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ("a", ["a"]),
        ("a b", ["a", "b"]),
        ("  a   b  ", ["a", "b"]),
        ("a\tb\nc\r\nd\fe\vf", ["a", "b", "c", "d", "e", "f"]),
        (
            "user:1001:profile\nuser:1001:permissions\n",
            ["user:1001:profile", "user:1001:permissions"],
        ),
    ],
)
def test_keys_split_on_ascii_whitespace(keys: str, expected: list[str]) -> None:
    assert keys_of(keys) == expected


@pytest.mark.parametrize(
    "key",
    [
        "search:東京\u3000駅",  # ideographic space
        "name:Zoë\u00a0Smith",  # no-break space
        "a\x1fb",  # unit separator: Python's str.split() would cut here
        "a\x1cb\x1db\x1eb\x85b",
    ],
)
def test_non_ascii_whitespace_is_part_of_a_key(key: str) -> None:
    """A producer in Go or Java that joins keys with ' ' must get exactly its keys back."""
    assert keys_of(f"{key} other") == [key, "other"]


@pytest.mark.parametrize(
    ("keys", "sep", "expected"),
    [
        ("a b,c", ",", ["a b", "c"]),
        ("first key\x1fsecond key", "\x1f", ["first key", "second key"]),
        ("a||b||c|d", "||", ["a", "b", "c|d"]),
        (" a ", ",", [" a "]),
        ("a b", "", ["a", "b"]),  # an empty sep is no sep
    ],
)
def test_sep_splits_exactly(keys: str, sep: str, expected: list[str]) -> None:
    assert keys_of(keys, sep=sep) == expected


# --- entry_fields: what the Python helper writes ----------------------------------------------


def test_entry_fields_write_version_and_space_separated_keys() -> None:
    assert entry_fields(["a", "b"]) == {"v": "1", "op": "unlink", "keys": "a b"}


def test_entry_fields_carry_trace_and_source() -> None:
    fields = entry_fields(["a"], traceparent="00-ab-cd-01", source="orders")
    assert (fields["traceparent"], fields["source"]) == ("00-ab-cd-01", "orders")


def test_entry_fields_pick_a_separator_for_keys_with_whitespace() -> None:
    fields = entry_fields(["first key", "second"])
    assert fields["sep"] == "\x1f"
    assert fields["keys"] == "first key\x1fsecond"


@pytest.mark.parametrize(
    "keys",
    [
        ["\x1e\x00\n\x1f", "y"],  # holds every preferred separator and ends in one of them
        ["a b", "\x1f\x1e\x1d\x1c", "\ue000"],
    ],
)
def test_entry_fields_separator_is_never_ambiguous(keys: list[str]) -> None:
    fields = entry_fields(keys)
    assert len(fields["sep"]) == 1
    assert parse_entry("1-0", as_stored(fields), LIMITS).keys == keys


@pytest.mark.parametrize("keys", [[], ["a", ""]])
def test_entry_fields_refuse_what_the_gateway_would_dead_letter(keys: list[str]) -> None:
    with pytest.raises(ValueError, match="key"):
        entry_fields(keys)


KEY = st.text(
    st.characters(codec="utf-8"),  # what Redis can hold as a key: no lone surrogates
    min_size=1,
    max_size=20,
)
AWKWARD_KEY = st.text(
    st.sampled_from([" ", "\t", "\n", "\x1f", "\x1e", "\x1d", "\x1c", "\x00", "\ue000", "a", "é"]),
    min_size=1,
    max_size=8,
)


@given(st.lists(st.one_of(KEY, AWKWARD_KEY), min_size=1, max_size=20))
def test_any_keys_survive_entry_fields_and_parse_entry(keys: list[str]) -> None:
    fields = entry_fields(keys, source="svc")
    invalidation = parse_entry("1-0", as_stored(fields), LIMITS)
    assert invalidation.keys == keys
    assert invalidation.op == "unlink"


# --- envelopes --------------------------------------------------------------------------------

BATCH = Batch(
    origin="us-east",
    epoch="e-7f3a",
    prev="1700000000000-0",
    events=[
        Invalidation("1700000000001-0", "unlink", ["a", "b"], "00-ab-cd-01", "orders"),
        Invalidation("1700000000002-0", "unlink", ["c"]),
    ],
    sent_ms=1700000000005,
    gap_from="1699999999000-0",
    gap_to="1699999999999-0",
)
HEARTBEAT = Heartbeat(
    origin="us-east", epoch="e-7f3a", last="1700000000002-0", sent_ms=1700000001000, backlog=12
)


@pytest.mark.parametrize("envelope", [BATCH, HEARTBEAT], ids=["batch", "heartbeat"])
def test_envelope_round_trip(envelope: Batch | Heartbeat) -> None:
    assert decode_envelope(encode_envelope(envelope)) == envelope


def test_envelope_field_is_d() -> None:
    assert ENVELOPE_FIELD == b"d"


def test_envelope_is_a_tagged_msgpack_map() -> None:
    """Any msgpack library can read it: a map with ``type``, invalidations as arrays."""
    plain = msgspec.msgpack.decode(encode_envelope(BATCH))
    assert plain["type"] == "batch"
    assert plain["events"][1] == ["1700000000002-0", "unlink", ["c"], None, None, None, None]


def test_envelope_from_a_newer_gateway_still_decodes() -> None:
    """Fields a later version appends (to the envelope or to each event) are ignored."""
    newer = {
        "type": "batch",
        "origin": "us-east",
        "epoch": "e1",
        "prev": "0-0",
        "events": [["1-0", "unlink", ["a"], None, "orders", None, None, "a-later-field", 7]],
        "sent_ms": 5,
        "partition": 3,
        "compression": {"kind": "none"},
    }
    batch = decode_envelope(msgspec.msgpack.encode(newer))
    assert isinstance(batch, Batch)
    assert batch.events == [Invalidation("1-0", "unlink", ["a"], None, "orders")]
    heartbeat = {"type": "heartbeat", "origin": "a", "epoch": "e", "last": "0-0", "sent_ms": 1}
    assert decode_envelope(msgspec.msgpack.encode({**heartbeat, "load": 0.5})) == Heartbeat(
        origin="a", epoch="e", last="0-0", sent_ms=1
    )


def test_envelope_from_an_older_gateway_decodes_with_defaults() -> None:
    """An older gateway knew neither the gap fields nor the event's trace and source."""
    older = {
        "type": "batch",
        "origin": "us-east",
        "epoch": "e1",
        "prev": "0-0",
        "events": [["1-0", "unlink", ["a", "b"]]],
        "sent_ms": 5,
    }
    batch = decode_envelope(msgspec.msgpack.encode(older))
    assert isinstance(batch, Batch)
    assert (batch.gap_from, batch.gap_to) == (None, None)
    assert batch.events == [Invalidation("1-0", "unlink", ["a", "b"], None, None)]
    heartbeat = decode_envelope(
        msgspec.msgpack.encode(
            {"type": "heartbeat", "origin": "a", "epoch": "e", "last": "0-0", "sent_ms": 1}
        )
    )
    assert isinstance(heartbeat, Heartbeat)
    assert heartbeat.backlog == 0


@pytest.mark.parametrize(
    "data",
    [
        b"not msgpack at all",
        msgspec.msgpack.encode({"type": "rekey", "origin": "a"}),
        msgspec.msgpack.encode({"type": "heartbeat", "origin": "a"}),
        msgspec.msgpack.encode(
            {
                "type": "batch",
                "origin": "a",
                "epoch": "e",
                "prev": "0-0",
                "sent_ms": 1,
                "events": [["1-0", "purge", ["a"]]],
            }
        ),
    ],
    ids=["garbage", "unknown-type", "missing-fields", "unknown-op"],
)
def test_what_is_not_an_envelope_raises_decode_error(data: bytes) -> None:
    """The receiver dead-letters these (``bad_envelope``); it must get this one exception type."""
    with pytest.raises(msgspec.DecodeError):
        decode_envelope(data)


# --- stream IDs -------------------------------------------------------------------------------


def test_stream_id_parses_text_and_bytes() -> None:
    assert StreamId.parse("1700000000000-3") == StreamId(1700000000000, 3)
    assert StreamId.parse(b"0-0") == StreamId(0, 0)
    assert str(StreamId(1700000000000, 3)) == "1700000000000-3"


def test_stream_ids_order_numerically_not_as_text() -> None:
    assert StreamId.parse("9-0") < StreamId.parse("10-0")
    assert StreamId.parse("5-9") < StreamId.parse("5-10")
    assert StreamId.parse("5-10") < StreamId.parse("6-0")
    assert max(["10-0", "9-99"], key=StreamId.parse) == "10-0"


@pytest.mark.parametrize(
    "text",
    ["", "5", "5-", "-5", "a-b", "5-5-5", " 5-5", "+5-5", "\u00b2-1", "\uff11-1", b"\xff-1"],
)
def test_stream_id_refuses_anything_else(text: str | bytes) -> None:
    with pytest.raises(ValueError, match=r"stream ID|ascii"):
        StreamId.parse(text)


# --- the published JSON Schemas ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(schemas()))
def test_committed_schema_matches_the_structs(name: str) -> None:
    """If this fails, the wire structs changed: run ``python -m invalgw.proto.schema``, review."""
    committed = (SCHEMA_DIR / name).read_text()
    assert committed == render(schemas()[name]), f"proto/schema/{name} is out of date"


def test_no_stale_schema_files() -> None:
    assert sorted(path.name for path in SCHEMA_DIR.glob("*.json")) == sorted(schemas())


def test_producer_schema_states_the_contract() -> None:
    schema = json.loads((SCHEMA_DIR / "producer-entry.json").read_text())
    entry = schema["$defs"]["ProducerEntry"]
    assert entry["required"] == ["op"]
    assert set(entry["properties"]) == {
        "op",
        "keys",
        "pattern",
        "version",
        "v",
        "sep",
        "traceparent",
        "source",
    }
    assert all(
        prop.get("type") == "string" or "enum" in prop for prop in entry["properties"].values()
    )
    assert "additionalProperties" not in entry  # unknown fields are allowed (and ignored)


_GUARD = Guard(
    namespace="gw", names=("invalidations",), max_keys=3, max_key_bytes=8, max_field_bytes=20
)
_KEY = st.text(alphabet="ab:é,\n gwinvalidations", max_size=10)
_EVENT = st.builds(
    Invalidation,
    st.just("1-0"),
    st.just("unlink"),
    st.lists(_KEY, max_size=4),
    st.none() | st.text(max_size=25),
    st.none() | st.text(max_size=6),
    st.none() | st.just("ab*"),
    st.none() | st.just("7"),
)


@given(st.lists(_EVENT, max_size=4))
def test_a_batch_accepted_at_once_holds_no_event_checked_one_by_one_refuses(
    events: list[Invalidation],
) -> None:
    if plainly_valid(events, _GUARD):
        for event in events:
            check_invalidation(event, _GUARD)


def test_the_usual_batch_is_accepted_at_once_and_a_reserved_key_is_not() -> None:
    usual = [Invalidation(f"1-{i}", "unlink", [f"u:{i}", "ab"], "00-ab", "svc") for i in range(9)]
    assert plainly_valid(usual, _GUARD)
    assert not plainly_valid([*usual, Invalidation("2-0", "unlink", ["gw:lag"])], _GUARD)
    assert not plainly_valid([Invalidation("2-0", "unlink", ["é"])], _GUARD)  # checked one by one
