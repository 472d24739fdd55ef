"""Redis stream IDs (``<ms>-<seq>``) as comparable values.

The millisecond part of an origin stream ID is the origin Redis's clock at XADD time; the gateway
measures cross-region lag from it.
"""

from __future__ import annotations

from typing import NamedTuple


class StreamId(NamedTuple):
    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str | bytes) -> StreamId:
        """Parse ``"1700000000000-3"``; raise ``ValueError`` on anything else."""
        if isinstance(text, bytes):
            text = text.decode("ascii")
        ms, sep, seq = text.partition("-")
        if not sep or not _digits(ms) or not _digits(seq):
            raise ValueError(f"not a stream ID: {text!r}")
        return cls(int(ms), int(seq))

    def previous(self) -> StreamId:
        """The greatest ID below this one: the range (previous, self] holds just this ID."""
        if self.seq:
            return StreamId(self.ms, self.seq - 1)
        if self.ms:
            return StreamId(self.ms - 1, 2**64 - 1)
        return self

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


ZERO = StreamId(0, 0)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
