"""The producer contract: one XADD of flat string fields into the region's stream.

A service in any language invalidates keys with::

    XADD invalidations * op unlink keys "user:1001:profile user:1001:perms"

or every key of a group or namespace with ``pattern`` instead of ``keys``::

    XADD invalidations * op unlink pattern "{user:1001}:*"

Every field is a string. This module turns the fields of one stream entry into an
:class:`Invalidation`, or explains in :class:`InvalidEntry` why it cannot. Fields this version does
not know are ignored, so producers may add fields before every gateway understands them.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from itertools import chain, repeat
from operator import itemgetter
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, UnsetType

CONTRACT_VERSION = 1
"""The contract version this package reads and writes (field ``v``)."""

Op = Literal["unlink", "expire", "hybrid", "invalidate"]
"""What an invalidation asks for. ``unlink``: remove at once in every region. ``expire``: a soft
invalidation, a short staggered TTL in every region. ``hybrid``: unlink in the writer's region,
expire elsewhere. ``invalidate``: each region's policy rules decide, key by key. A region's policy
may refuse a softer mode than its rule for a key; a stricter one is always honoured."""

OPS: tuple[str, ...] = typing.get_args(Op)

WHITESPACE = " \t\n\r\f\v"
"""What separates keys when an entry has no ``sep``: ASCII whitespace only, as in most languages'
"split on whitespace". Other characters (``\\x1f``, a no-break space, an ideographic space) are
part of a key."""
WILDCARDS = "*?[\\"
"""The characters that make a key pattern a glob (Redis ``SCAN MATCH`` syntax): the part of a
pattern before the first of them is literal."""
_WHITESPACE_RUN = re.compile(r"[ \t\n\r\f\v]+")


def _doc(description: str, *examples: str) -> msgspec.Meta:
    return msgspec.Meta(description=description, examples=list(examples) or None)


class ProducerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of one invalidation as a producer writes them (all values are strings)."""

    op: Annotated[
        Op,
        _doc(
            "unlink (at once everywhere), expire (soft, staggered TTL everywhere), hybrid (unlink "
            "in the writer's region, expire elsewhere) or invalidate (the policy decides).",
            "unlink",
        ),
    ]
    keys: Annotated[
        str | UnsetType,
        _doc(
            "The keys, separated by ASCII whitespace (space, tab, CR, LF, FF, VT), "
            "or by `sep` when it is given. Exactly one of `keys` and `pattern` is required.",
            "user:1001:profile user:1001:permissions",
        ),
    ] = UNSET
    pattern: Annotated[
        str | UnsetType,
        _doc(
            "A glob (SCAN MATCH syntax) selecting the keys to invalidate: a hash-tag group or a "
            "namespace. Needs a literal prefix before the first wildcard.",
            "{user:1001}:*",
        ),
    ] = UNSET
    version: Annotated[
        str | UnsetType,
        _doc(
            "Version of the change (a non-negative integer that grows with each change of the "
            "source). Leaves a tombstone that makes the fill helper refuse older values.",
            "1042",
        ),
    ] = UNSET
    v: Annotated[
        str, _doc("Contract version. Absent means 1; other versions are dead-lettered.", "1")
    ] = "1"
    sep: Annotated[
        str | UnsetType,
        _doc(
            "Separator between keys, for keys that contain whitespace. Empty means absent.",
            "\u001f",
        ),
    ] = UNSET
    traceparent: Annotated[
        str | UnsetType,
        _doc(
            "W3C trace context of the change behind this invalidation; carried to every region.",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ] = UNSET
    source: Annotated[
        str | UnsetType,
        _doc(
            "Name of the producing service, kept for tracing and dead-letter diagnosis.", "orders"
        ),
    ] = UNSET


class Invalidation(msgspec.Struct, frozen=True, array_like=True):
    """One validated invalidation, as it travels between regions inside an envelope.

    ``id`` is the entry's ID in its origin stream; its millisecond part is the origin's clock.
    New fields must be appended with defaults (older gateways ignore them).
    """

    id: str
    op: Op
    keys: list[str]
    """Empty for a pattern invalidation."""
    traceparent: str | None = None
    source: str | None = None
    pattern: str | None = None
    version: str | None = None


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds an entry must respect; entries outside them are dead-lettered."""

    max_keys: int = 1000
    max_key_bytes: int = 1024
    max_field_bytes: int = 65536
    min_pattern_prefix: int = 3
    """Characters a pattern must fix before its first wildcard, so that one event cannot wipe a
    whole cache (``*``) by mistake."""

    def __post_init__(self) -> None:
        for name in ("max_keys", "max_key_bytes", "max_field_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")
        if self.min_pattern_prefix < 0:
            raise ValueError("min_pattern_prefix: must be 0 or more")

    def check_names(self, keys: Sequence[str], pattern: str | None) -> None:
        """Raise :class:`InvalidEntry` if ``keys`` or ``pattern`` reach names nobody may
        invalidate; plain limits know none (see :class:`invalgw.proto.guard.Guard`)."""


INVALID_ENTRY_CODES = (
    "missing_field",
    "unknown_op",
    "bad_version",
    "no_keys",
    "too_many_keys",
    "key_too_long",
    "empty_key",
    "not_utf8",
    "field_too_long",
    "keys_and_pattern",
    "pattern_too_broad",
    "bad_fence_version",
    "bad_field",
    "duplicate_field",
    "reserved_key",
    "reserved_pattern",
)
"""Every :attr:`InvalidEntry.code` an entry can be dead-lettered with."""


class InvalidEntry(ValueError):
    """An entry that is not a valid invalidation.

    ``reason`` says why in one line, for people; ``code`` names the kind of problem in a word,
    for metrics (``missing_field``, ``unknown_op``, ``bad_version``, ``no_keys``,
    ``too_many_keys``, ``key_too_long``, ``empty_key``, ``not_utf8``, ``field_too_long``,
    ``keys_and_pattern``, ``pattern_too_broad``, ``bad_fence_version``, ``bad_field``,
    ``duplicate_field``, ``reserved_key``, ``reserved_pattern``, ``deleted``).
    """

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class StreamFields(dict[bytes, bytes]):
    """An entry's fields as a dict, remembering the first field name the entry held twice.

    Redis keeps every field of an XADD, repeated names included (``op purge op unlink``); a
    plain dict would silently keep the last one. The gateway's clients read entries into this
    type, and :func:`parse_entry` refuses an entry with ``duplicate`` set.
    """

    __slots__ = ("duplicate", "pairs")

    def __init__(self, pairs: Sequence[bytes] = ()) -> None:
        super().__init__()
        self.pairs = list(pairs)
        """Every field as Redis holds it, repeated names included (kept in a dead letter)."""
        self.duplicate: bytes | None = None
        for i in range(0, len(pairs) - 1, 2):
            name = pairs[i]
            if self.duplicate is None and name in self:
                self.duplicate = name
            self[name] = pairs[i + 1]


def decode_fields(fields: dict[bytes, bytes]) -> dict[str, str]:
    """Decode raw stream fields as UTF-8 text, naming the first field that is not."""
    out: dict[str, str] = {}
    for name, value in fields.items():
        try:
            out[name.decode()] = value.decode()
        except UnicodeDecodeError:
            shown = name.decode(errors="backslashreplace")
            raise InvalidEntry(f"field '{shown}' is not UTF-8 text", "not_utf8") from None
    return out


_USUAL_FIELDS = ({b"v", b"op", b"keys"}, {b"op", b"keys"})
_VERSION = str(CONTRACT_VERSION)


def parse_entry(entry_id: str, fields: dict[bytes, bytes], limits: Limits) -> Invalidation:
    """Validate one stream entry; raise :class:`InvalidEntry` with the reason if it is not valid."""
    duplicate = getattr(fields, "duplicate", None)
    if duplicate is not None:
        raise InvalidEntry(
            f"field {duplicate.decode(errors='backslashreplace')!r} is given more than once",
            "duplicate_field",
        )
    usual = _parse_usual(entry_id, fields, limits)
    event = usual if usual is not None else _parse_any(entry_id, fields, limits)
    limits.check_names(event.keys, event.pattern)
    return event


def check_invalidation(event: Invalidation, limits: Limits) -> None:
    """Validate an invalidation that arrived in an envelope with this region's ``limits``, as if
    a producer of this region had written it; raise :class:`InvalidEntry` if it is not valid."""
    for name, text in (("traceparent", event.traceparent), ("source", event.source)):
        if text is not None and len(text.encode()) > limits.max_field_bytes:
            raise InvalidEntry(
                f"field {name!r} is over the limit of {limits.max_field_bytes} bytes",
                "field_too_long",
            )
    if event.version is not None:
        _fence_version(event.version)
    if event.pattern is not None:
        if event.keys:
            raise InvalidEntry("give either 'keys' or 'pattern', not both", "keys_and_pattern")
        _checked_pattern(event.pattern, limits)
    elif not event.keys:
        raise InvalidEntry("no keys and no pattern", "no_keys")
    else:
        _check_keys(event.keys, limits)
        size = sum(len(key.encode()) for key in event.keys) + len(event.keys) - 1
        if size > limits.max_field_bytes:
            raise InvalidEntry(
                f"keys take {size} bytes, over the limit of {limits.max_field_bytes}",
                "field_too_long",
            )
    limits.check_names(event.keys, event.pattern)


def plainly_valid(events: Sequence[Invalidation], limits: Limits) -> bool:
    """Whether :func:`check_invalidation` surely accepts every one of ``events``, found for the
    whole batch at once: the usual envelope (ASCII keys, no pattern, no fence version) takes a
    few passes at C speed instead of a call per event. False means: check them one by one."""
    most = _most_plain_keys(events, limits.max_field_bytes // 4)
    if most is None or most > limits.max_keys:
        return False
    keys = [key for event in events for key in event.keys]
    if not keys:
        return True
    if not "".join(keys).isascii():  # then a key's length in characters is its length in bytes
        return False
    longest = max(map(len, keys))
    if min(map(len, keys)) == 0 or longest > limits.max_key_bytes:
        return False
    if most * (longest + 1) - 1 > limits.max_field_bytes:  # an event's keys, joined, may be over
        return False
    try:
        limits.check_names(keys, None)
    except InvalidEntry:
        return False
    return True


def _most_plain_keys(events: Sequence[Invalidation], field_chars: int) -> int | None:
    """The most keys of one of ``events``; None if one has a pattern, a fence version, no keys,
    or a traceparent or source of over ``field_chars`` characters (4 bytes each at most)."""
    most = 0
    for event in events:
        if event.pattern is not None or event.version is not None or not event.keys:
            return None
        trace, source = event.traceparent, event.source
        if (trace is not None and len(trace) > field_chars) or (
            source is not None and len(source) > field_chars
        ):
            return None
        if len(event.keys) > most:
            most = len(event.keys)
    return most


def _parse_any(entry_id: str, fields: dict[bytes, bytes], limits: Limits) -> Invalidation:
    if not fields:
        raise InvalidEntry("entry has no fields (it was deleted or trimmed)", "deleted")
    for name, value in fields.items():
        if len(value) > limits.max_field_bytes:
            raise InvalidEntry(
                f"field {name.decode(errors='replace')!r} is {len(value)} bytes, "
                f"over the limit of {limits.max_field_bytes}",
                "field_too_long",
            )
    text = decode_fields(fields)
    try:
        entry = msgspec.convert(text, ProducerEntry)
    except msgspec.ValidationError as exc:
        raise InvalidEntry(*_field_error(exc)) from None
    if entry.v != _VERSION:
        raise InvalidEntry(
            f"unsupported contract version v={entry.v!r}; this gateway reads v={CONTRACT_VERSION}",
            "bad_version",
        )
    version = _fence_version(entry.version) if entry.version else None
    if entry.pattern:
        if entry.keys:
            raise InvalidEntry("give either 'keys' or 'pattern', not both", "keys_and_pattern")
        return Invalidation(
            entry_id,
            entry.op,
            [],
            entry.traceparent or None,
            entry.source or None,
            _checked_pattern(entry.pattern, limits),
            version,
        )
    if not entry.keys:
        raise InvalidEntry("no keys: field 'keys' (or 'pattern') is missing or empty", "no_keys")
    keys = _split_keys(entry.keys, entry.sep or None)
    if not keys or keys == [""]:
        raise InvalidEntry("no keys: field 'keys' is empty", "no_keys")
    _check_keys(keys, limits)
    return Invalidation(
        entry_id, entry.op, keys, entry.traceparent or None, entry.source or None, None, version
    )


def _check_keys(keys: Sequence[str], limits: Limits) -> None:
    if len(keys) > limits.max_keys:
        raise InvalidEntry(
            f"{len(keys)} keys, over the limit of {limits.max_keys} per entry", "too_many_keys"
        )
    for key in keys:
        if not key:
            raise InvalidEntry(
                "empty key: 'keys' has two separators in a row or at an end", "empty_key"
            )
        if len(key.encode()) > limits.max_key_bytes:
            raise InvalidEntry(
                f"key {key[:40]!r}... is {len(key.encode())} bytes, "
                f"over the limit of {limits.max_key_bytes}",
                "key_too_long",
            )


def _checked_pattern(pattern: str, limits: Limits) -> str:
    if len(pattern.encode()) > limits.max_key_bytes:
        raise InvalidEntry(
            f"pattern is {len(pattern.encode())} bytes, over the limit of {limits.max_key_bytes}",
            "key_too_long",
        )
    prefix = len(pattern)
    for i, char in enumerate(pattern):
        if char in WILDCARDS:
            prefix = i
            break
    if prefix < limits.min_pattern_prefix:
        raise InvalidEntry(
            f"pattern {pattern[:40]!r} fixes {prefix} characters before its first wildcard; "
            f"at least {limits.min_pattern_prefix} are required (limits.min_pattern_prefix)",
            "pattern_too_broad",
        )
    return pattern


def _fence_version(text: str) -> str:
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise InvalidEntry(
            f"version {text[:40]!r} must be a non-negative integer without leading zeros",
            "bad_fence_version",
        )
    return text


def _parse_usual(entry_id: str, fields: dict[bytes, bytes], limits: Limits) -> Invalidation | None:
    """The entry most producers write (``v 1``, ``op unlink``, keys split on whitespace, nothing
    else), validated with a fraction of the general path's work; None for any other entry, and
    for any problem, which the general path then describes."""
    if fields.keys() not in _USUAL_FIELDS or fields[b"op"] != b"unlink":
        return None
    if fields.get(b"v", b"1") != b"1":
        return None
    raw = fields[b"keys"]
    if len(raw) > limits.max_field_bytes:
        return None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    if not text.isascii() or "\x1c" in text or "\x1d" in text or "\x1e" in text or "\x1f" in text:
        return None  # str.split would also split on \x1c-\x1f: the general path splits exactly
    keys = text.split()
    if not keys or len(keys) > limits.max_keys or len(raw) > limits.max_key_bytes:
        return None
    return Invalidation(entry_id, "unlink", keys)


_USUAL_SIZE = 3
_v_op = itemgetter(b"v", b"op")
_USUAL_V_OP = {(b"1", b"unlink")}
_keys_field = itemgetter(b"keys")
_SPLIT_TOO = (b"\x1c", b"\x1d", b"\x1e", b"\x1f")
"""Bytes ``str.split`` also splits on: an entry holding one goes the general way."""


def parse_usual_batch(
    entries: Sequence[tuple[bytes, dict[bytes, bytes]]], limits: Limits
) -> list[Invalidation] | None:
    """Every entry of a batch parsed as :func:`parse_entry` would, when each is the entry most
    producers write (``v 1``, ``op unlink``, ASCII keys split on whitespace, nothing else) and
    none names a key nobody may invalidate: the checks run once over the whole batch, at C
    speed, instead of a call per entry. None when any entry is not so plain (then parse each)."""
    if not entries:
        return []
    fields = list(map(itemgetter(1), entries))
    if set(map(type, fields)) != {dict} or set(map(len, fields)) != {_USUAL_SIZE}:
        return None  # a deleted entry ({}), a repeated field (StreamFields), other fields
    try:
        if set(map(_v_op, fields)) != _USUAL_V_OP:
            return None
        raws = list(map(_keys_field, fields))
    except KeyError:  # three fields, not these
        return None
    if max(map(len, raws)) > min(limits.max_field_bytes, limits.max_key_bytes):
        return None
    blob = b" ".join(raws)
    if not blob.isascii() or any(byte in blob for byte in _SPLIT_TOO):
        return None
    keys = list(map(str.split, map(bytes.decode, raws)))
    sizes = set(map(len, keys))
    if 0 in sizes or max(sizes) > limits.max_keys:
        return None
    try:
        limits.check_names(list(chain.from_iterable(keys)), None)
    except InvalidEntry:
        return None  # parsed one by one, the entry that names one is refused alone
    ids = map(bytes.decode, map(itemgetter(0), entries))
    unlink: Op = "unlink"
    return list(map(Invalidation, ids, repeat(unlink), keys))


def _split_keys(keys: str, sep: str | None) -> list[str]:
    if sep is not None:
        return keys.split(sep)
    keys = keys.strip(WHITESPACE)
    return _WHITESPACE_RUN.split(keys) if keys else []


def _field_error(exc: msgspec.ValidationError) -> tuple[str, str]:
    message = str(exc)
    if message.startswith("Object missing required field"):
        return f"missing field {message.split('`')[1]!r}", "missing_field"
    if message.endswith("at `$.op`"):
        op = message.split(chr(39))[1]
        return f"unknown op {op!r}; known ops: {', '.join(OPS)}", "unknown_op"
    return message.replace("`$.", "field `"), "bad_field"


def entry_fields(
    keys: list[str] | tuple[str, ...] = (),
    *,
    op: Op = "unlink",
    pattern: str | None = None,
    version: int | str | None = None,
    traceparent: str | None = None,
    source: str | None = None,
) -> dict[str, str]:
    """The XADD fields for an invalidation of ``keys`` (or of every key matching ``pattern``);
    picks a separator none of the keys holds."""
    if bool(keys) == bool(pattern):
        raise ValueError("an invalidation needs keys or a pattern (not both)")
    if any(not key for key in keys):
        raise ValueError("keys must not be empty")
    fields = {"v": str(CONTRACT_VERSION), "op": op}
    if version is not None:
        fields["version"] = str(version)
    if pattern:
        fields["pattern"] = pattern
    elif any(_WHITESPACE_RUN.search(key) for key in keys):
        sep = _free_separator(keys)
        fields["sep"] = sep
        fields["keys"] = sep.join(keys)
    else:
        fields["keys"] = " ".join(keys)
    if traceparent:
        fields["traceparent"] = traceparent
    if source:
        fields["source"] = source
    return fields


def _free_separator(keys: list[str] | tuple[str, ...]) -> str:
    """One character that occurs in none of the keys (one character, so splitting is exact)."""
    used = {char for key in keys for char in key}
    for sep in ("\x1f", "\x1e", "\x1d", "\x1c"):
        if sep not in used:
            return sep
    code = 0xE000  # the Private Use Area: code points no standard assigns
    while chr(code) in used:
        code += 1
    return chr(code)
