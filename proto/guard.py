"""The gateway's own keys are no producer's or peer's target.

Everything a gateway keeps in its region's Redis lives under its namespace (``invalgw:`` by
default: mirror streams and their state, dead letters, gaps, epoch, links, lease, status) or is the
region's stream itself (``invalidations``). An invalidation that names one of them, or a pattern
that *could* match one, would let a producer (or a peer, through an envelope) wipe the dead
letters, the dedup state or the stream and its consumer groups, in every region. :class:`Guard`
refuses them; the gateway checks every entry with it where the entry was written, and every event
of an envelope again in each receiving region, with that region's own names.

A pattern is judged by what it can match, not by how it is spelled: ``*``, ``inv*``,
``[i]nvalgw:*`` and ``invalgw?dead`` are all refused, ``{user:1001}:*`` is not. The test runs the
glob (SCAN ``MATCH`` syntax, byte by byte, as Redis does) against the namespace prefix followed by
anything, and against each reserved name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from invalgw.proto.entry import InvalidEntry, Limits

_ANY_BYTE = frozenset(range(256))
_Token = frozenset[int] | None
"""One step of a glob: the bytes it accepts, or None for ``*`` (any run of bytes)."""


def glob_tokens(pattern: bytes) -> list[_Token]:
    """``pattern`` as steps, with Redis's reading of ``*``, ``?``, ``[...]`` and ``\\``."""
    tokens: list[_Token] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == ord("*"):
            if not tokens or tokens[-1] is not None:
                tokens.append(None)
        elif char == ord("?"):
            tokens.append(_ANY_BYTE)
        elif char == ord("[") and i + 1 < n:
            accepted, i = _char_class(pattern, i + 1)
            tokens.append(accepted)
            continue
        elif char == ord("\\") and i + 1 < n:
            i += 1
            tokens.append(frozenset((pattern[i],)))
        else:
            tokens.append(frozenset((char,)))
        i += 1
    return tokens


def _char_class(pattern: bytes, i: int) -> tuple[frozenset[int], int]:
    """The bytes a ``[...]`` starting at ``i`` (after the ``[``) accepts, and where it ends."""
    n = len(pattern)
    negate = pattern[i] == ord("^")
    i += negate
    chosen: set[int] = set()
    while i < n and pattern[i] != ord("]"):
        if pattern[i] == ord("\\") and i + 1 < n:
            i += 1
            chosen.add(pattern[i])
        elif i + 2 < n and pattern[i + 1] == ord("-"):
            low, high = sorted((pattern[i], pattern[i + 2]))
            chosen.update(range(low, high + 1))
            i += 2
        else:
            chosen.add(pattern[i])
        i += 1
    if i >= n:  # no closing bracket: read conservatively, as "any byte"
        return _ANY_BYTE, n
    return (_ANY_BYTE - chosen if negate else frozenset(chosen)), i + 1


def _closure(tokens: Sequence[_Token], states: Iterable[int]) -> set[int]:
    out: set[int] = set()
    for state in states:
        while state not in out:
            out.add(state)
            if state < len(tokens) and tokens[state] is None:
                state += 1
            else:
                break
    return out


def could_match(tokens: Sequence[_Token], text: bytes, *, prefix: bool) -> bool:
    """Whether the glob matches ``text`` (``prefix``: some string that starts with ``text``)."""
    n = len(tokens)
    states = _closure(tokens, [0])
    for byte in text:
        following: list[int] = []
        for state in states:
            if state < n:
                token = tokens[state]
                if token is None:
                    following.append(state)
                elif byte in token:
                    following.append(state + 1)
        states = _closure(tokens, following)
        if not states:
            return False
    return bool(states) if prefix else n in states


class Guard(Limits, frozen=True, kw_only=True):
    """:class:`Limits` plus the names that belong to the gateway in one region.

    ``namespace``: every key that starts with ``<namespace>:`` is the gateway's. ``names``: other
    keys that are (the region's stream).
    """

    namespace: str = "invalgw"
    names: tuple[str, ...] = ()
    exact: frozenset[str] = frozenset()
    """Derived: the namespace itself and ``names`` (set by the constructor)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        msgspec.structs.force_setattr(self, "exact", frozenset((self.namespace, *self.names)))

    def check_names(self, keys: Sequence[str], pattern: str | None) -> None:
        prefix = self.namespace + ":"
        exact = self.exact
        # one search of all the keys at C speed; a hit is confirmed key by key (a key may hold
        # the separator, and then the search may find what no key starts with)
        if keys and (not exact.isdisjoint(keys) or "\n" + prefix in "\n" + "\n".join(keys)):
            self._check_each(keys, prefix, exact)
        if pattern is not None and self.pattern_reaches(pattern):
            raise InvalidEntry(
                f"pattern {pattern[:80]!r} could match the gateway's own keys ({self._owned()}); "
                "give a pattern that cannot",
                "reserved_pattern",
            )

    def _check_each(self, keys: Sequence[str], prefix: str, exact: frozenset[str]) -> None:
        for key in keys:
            if key.startswith(prefix) or key in exact:
                raise InvalidEntry(
                    f"key {key[:80]!r} belongs to the gateway ({self._owned()}); "
                    "producers and peers may not invalidate it",
                    "reserved_key",
                )

    def pattern_reaches(self, pattern: str) -> bool:
        """Whether ``pattern`` could match a key of the gateway."""
        tokens = glob_tokens(pattern.encode())
        if could_match(tokens, (self.namespace + ":").encode(), prefix=True):
            return True
        exact = (self.namespace, *self.names)
        return any(could_match(tokens, name.encode(), prefix=False) for name in exact)

    def _owned(self) -> str:
        names = ", ".join(repr(name) for name in self.names)
        return f"namespace {self.namespace + ':'!r}" + (f", {names}" if names else "")
