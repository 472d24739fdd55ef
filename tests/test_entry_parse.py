"""The shortcut for the usual producer entry decides exactly as the general validation does."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invalgw.proto.entry import Invalidation, InvalidEntry, Limits, _parse_any, parse_entry

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
