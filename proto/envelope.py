"""Envelopes: what a gateway writes into a peer region's mirror stream.

One mirror stream entry carries one envelope in its ``d`` field, encoded as MessagePack:

- :class:`Batch`: the invalidations a forwarder read from its origin stream in one go;
- :class:`Heartbeat`: sent when the link is idle, so lag is known without traffic and a silent
  link shows up within seconds.

Both name the origin's *epoch* (it changes when the origin's stream is lost, for instance after a
Redis restart without persistence) so that a receiver can tell a gap from a pause. New fields must
be appended with defaults; decoders ignore fields they do not know.
"""

from __future__ import annotations

import msgspec

from invalgw.proto.entry import Invalidation

ENVELOPE_FIELD = b"d"
"""The mirror stream entry field that holds the encoded envelope."""


class Batch(msgspec.Struct, frozen=True, tag="batch"):
    """Invalidations from one origin stream, in origin-ID order."""

    origin: str
    """Name of the region whose producers wrote these invalidations."""
    epoch: str
    """Identity of the origin stream's life; a new epoch means the origin lost its stream."""
    prev: str
    """Origin ID of the last invalidation this forwarder delivered before this batch (``0-0``)."""
    events: list[Invalidation]
    sent_ms: int
    """Origin Redis clock when the batch was sent, in milliseconds since the epoch."""
    gap_from: str | None = None
    """When the origin trimmed entries this peer had not yet received: the first lost ID."""
    gap_to: str | None = None
    """... and the last lost ID. The receiver records the gap and runs its resync."""


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat"):
    """An idle link's proof of life."""

    origin: str
    epoch: str
    last: str
    """Origin ID of the last invalidation delivered on this link (``0-0`` if none yet)."""
    sent_ms: int
    backlog: int = 0
    """Entries of the origin stream still waiting for this peer when the heartbeat was sent."""


Envelope = Batch | Heartbeat

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode_envelope(data: bytes) -> Envelope:
    """Decode an envelope; raise ``msgspec.DecodeError`` (a ``ValueError``) if it is not one."""
    envelope: Envelope = _decoder.decode(data)
    return envelope
