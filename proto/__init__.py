"""Wire format of the invalidation gateway: the producer contract and the mirror envelopes.

No I/O here and no dependency on the gateway: producers and tools can import it alone.
"""

from invalgw.proto.entry import (
    CONTRACT_VERSION,
    WILDCARDS,
    Invalidation,
    InvalidEntry,
    Limits,
    ProducerEntry,
    StreamFields,
    check_invalidation,
    entry_fields,
    parse_entry,
    parse_usual_batch,
    plainly_valid,
)
from invalgw.proto.envelope import Batch, Envelope, Heartbeat, decode_envelope, encode_envelope
from invalgw.proto.guard import Guard
from invalgw.proto.partition import (
    MAX_PARTITIONS,
    hash_tag,
    partition_of,
    partition_stream,
    pattern_partition,
    stream_for,
)
from invalgw.proto.streamid import StreamId

__all__ = [
    "CONTRACT_VERSION",
    "MAX_PARTITIONS",
    "WILDCARDS",
    "Batch",
    "Envelope",
    "Guard",
    "Heartbeat",
    "InvalidEntry",
    "Invalidation",
    "Limits",
    "ProducerEntry",
    "StreamFields",
    "StreamId",
    "check_invalidation",
    "decode_envelope",
    "encode_envelope",
    "entry_fields",
    "hash_tag",
    "parse_entry",
    "parse_usual_batch",
    "partition_of",
    "partition_stream",
    "pattern_partition",
    "plainly_valid",
    "stream_for",
]
