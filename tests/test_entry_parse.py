"""The shortcut for the usual producer entry decides exactly as the general validation does."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invalgw.proto import Guard
from invalgw.proto.entry import (
    Invalidation,
    InvalidEntry,
    Limits,
    StreamFields,
    _parse_any,
    parse_entry,
    parse_usual_batch,
)

LIMITS = Limits(max_keys=3, max_key_bytes=10, max_field_bytes=40)
NAMES = st.sampled_from([b"v", b"op", b"keys", b"sep", b"traceparent", b"source", b"x"])
VALUES = st.one_of(
    st.sampled_from(
        [
            b"1",
            b"2",
            b"",
            b"unlink",
            b"expire",
            b"a b",
            b"k toolongkey:1",
            b"\xff",
            "\u00e9".encode() * 6,
        ]
    ),
    st.binary(max_size=50),
    st.lists(st.sampled_from(["k", "key:1", " ", "\t", "\u00e9", "\x1f"]), max_size=30).map(
        lambda parts: "".join(parts).encode()
    ),
)


def _outcome(parse: object, fields: dict[bytes, bytes]) -> object:
    try:
        result = parse("1-1", fields, LIMITS)  # type: ignore[operator]
    except InvalidEntry as exc:
        return ("invalid", exc.code, exc.reason)
    assert isinstance(result, Invalidation)
    return result


USUAL_SHAPED = st.fixed_dictionaries(
    {b"op": st.one_of(st.just(b"unlink"), VALUES), b"keys": VALUES},
    optional={b"v": st.one_of(st.just(b"1"), VALUES), b"source": VALUES},
)


EDGES = [
    {b"op": b"unlink", b"keys": b"k toolongkey:1"},
    {b"op": b"unlink", b"keys": "\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9".encode()},
    {b"op": b"unlink", b"keys": b"a b c d"},
    {b"op": b"unlink", b"keys": b" \t "},
    {b"op": b"unlink", b"keys": b"k" * 41},
    {b"op": b"unlink", b"keys": b"a \xff"},
    {b"op": b"unlink", b"keys": b"a", b"v": b"2"},
    {b"op": b"unlink", b"keys": b"a", b"sep": b","},
    {b"op": b"unlink", b"keys": b"a", b"x": b"y"},
    {b"op": b"expire", b"keys": b"a"},
    {b"op": b"unlink"},
    {},
]


@pytest.mark.parametrize("fields", EDGES)
def test_edge_entries_parse_as_the_general_path_parses_them(fields: dict[bytes, bytes]) -> None:
    assert _outcome(parse_entry, fields) == _outcome(_parse_any, fields)


@settings(max_examples=300)
@given(st.one_of(USUAL_SHAPED, st.dictionaries(NAMES, VALUES, max_size=5)))
def test_usual_entries_parse_as_the_general_path_parses_them(fields: dict[bytes, bytes]) -> None:
    assert _outcome(parse_entry, fields) == _outcome(_parse_any, fields)


def test_the_usual_entry_is_parsed() -> None:
    fields = {b"v": b"1", b"op": b"unlink", b"keys": b"user:1 user:2"}
    assert parse_entry("5-0", fields, Limits()) == Invalidation(
        "5-0", "unlink", ["user:1", "user:2"]
    )


def test_key_limit_counts_bytes_not_characters() -> None:
    six_chars_twelve_bytes = "\u00e9" * 6
    fields = {b"op": b"unlink", b"keys": f"ok {six_chars_twelve_bytes}".encode()}
    with pytest.raises(InvalidEntry) as caught:
        parse_entry("1-1", fields, LIMITS)
    assert caught.value.code == "key_too_long"
    assert "12 bytes" in caught.value.reason


GUARD = Guard(max_keys=3, max_key_bytes=10, max_field_bytes=40, names=("stream",))
BATCH_VALUES = st.one_of(
    VALUES, st.sampled_from([b"stream", b"a invalgw:x", b"invalgw", b"a\nb", b"a\x1cb"])
)
USUAL_ENTRY = st.fixed_dictionaries(
    {b"v": st.just(b"1"), b"op": st.just(b"unlink"), b"keys": BATCH_VALUES}
)
MOSTLY_VALID = st.fixed_dictionaries(
    {
        b"v": st.just(b"1"),
        b"op": st.just(b"unlink"),
        b"keys": st.sampled_from([b"a", b"a b", b" k1\tk2  k3 ", b"a\x1cb", b"stream", b""]),
    }
)


def _each(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[object]:
    out: list[object] = []
    for entry_id, fields in entries:
        try:
            out.append(parse_entry(entry_id.decode(), fields, GUARD))
        except InvalidEntry as exc:
            out.append(("invalid", exc.code))
    return out


@settings(max_examples=300)
@given(
    st.one_of(
        st.lists(st.one_of(USUAL_ENTRY, USUAL_SHAPED, st.just({})), max_size=6),
        st.lists(MOSTLY_VALID, max_size=4),
    )
)
def test_a_batch_parsed_at_once_parses_as_each_entry_would(
    batch: list[dict[bytes, bytes]],
) -> None:
    """The batch path answers only for batches of usual entries that are all valid, and then
    exactly as parsing each entry would; for any other batch it declines (None)."""
    entries = [(f"{i + 1}-0".encode(), fields) for i, fields in enumerate(batch)]
    at_once = parse_usual_batch(entries, GUARD)
    if at_once is not None:
        assert at_once == _each(entries)


def test_a_usual_batch_is_parsed_at_once() -> None:
    entries = [(b"1-0", {b"v": b"1", b"op": b"unlink", b"keys": b"a b"})] * 3
    assert parse_usual_batch(entries, GUARD) == [Invalidation("1-0", "unlink", ["a", "b"])] * 3
    repeated = StreamFields([b"v", b"1", b"op", b"unlink", b"keys", b"a", b"keys", b"b"])
    assert parse_usual_batch([*entries, (b"2-0", repeated)], GUARD) is None
    reserved = (b"2-0", {b"v": b"1", b"op": b"unlink", b"keys": b"a stream"})
    assert parse_usual_batch([*entries, reserved], GUARD) is None
