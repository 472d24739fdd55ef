"""Names of the keys and consumer groups the gateway uses, in one place.

Everything the gateway creates lives under the configured namespace (default ``invalgw``). A mirror
stream and its dedup state share a hash tag, so the append script also works on a Redis Cluster.

A partitioned stream (``[streams] partitions = P`` above 1) has one set of names per partition:
:meth:`Names.partition` gives partition ``p`` of stream ``S`` the stream ``{S:p}``, and every key
the gateway keeps for that partition ends with the same hash tag (``<namespace>:status:{S:p}``,
``<namespace>:link:<peer>:{S:p}``, …), so they all live in the partition's slot and every
transaction and function call stays in one slot of a Redis Cluster. Its mirror stream in a peer's
Redis is ``<namespace>:mirror:{<origin>:p}``. With ``P = 1`` the names are the unpartitioned ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from invalgw.proto import partition_stream

APPLY_GROUP = "apply"


def forward_group(peer: str) -> str:
    """The consumer group on the local stream that feeds ``peer``."""
    return f"to:{peer}"


@dataclass(frozen=True)
class Names:
    namespace: str
    local_stream: str
    """The stream this set of names reads: the configured one, or one partition of it."""
    suffix: str = ""
    """Ends every key of a partition: ``":{S:p}"`` (its hash tag); empty when not partitioned."""
    partition_index: int | None = None
    """The partition these names are for (None: the stream is not partitioned)."""

    def partition(self, partition: int, partitions: int) -> Names:
        """The names of partition ``partition`` of ``partitions`` (these names if only one)."""
        if partitions == 1:
            return self
        stream = partition_stream(self.local_stream, partition, partitions)
        return Names(self.namespace, stream, f":{stream}", partition)

    def mirror(self, origin: str, partition: int | None = None) -> str:
        """Stream in this region's Redis holding envelopes from ``origin`` (from partition
        ``partition`` of its stream, if that stream is partitioned)."""
        tag = origin if partition is None else f"{origin}:{partition}"
        return f"{self.namespace}:mirror:{{{tag}}}"

    def mirror_state(self, origin: str, partition: int | None = None) -> str:
        """Hash next to :meth:`mirror`: the last batch accepted from ``origin`` (for dedup)."""
        return f"{self.mirror(origin, partition)}:state"

    def mirror_status(self, origin: str, partition: int | None = None) -> str:
        """Hash of this region's status of one mirror stream, in the mirror's slot: used when
        either side is partitioned (else the status is a field of :attr:`status`)."""
        tag = origin if partition is None else f"{origin}:{partition}"
        return f"{self.namespace}:status:{{{tag}}}"

    def link(self, peer: str) -> str:
        """Hash in the origin's Redis: what the forwarder has delivered to ``peer``."""
        return f"{self.namespace}:link:{peer}{self.suffix}"

    @property
    def dead_letters(self) -> str:
        return f"{self.namespace}:dead{self.suffix}"

    @property
    def gaps(self) -> str:
        """Stream of recorded gaps: invalidations a region may have missed."""
        return f"{self.namespace}:gaps{self.suffix}"

    @property
    def lost(self) -> str:
        """Hash: per stream and consumer group, the last lost ID already reported as a gap."""
        return f"{self.namespace}:lost{self.suffix}"

    @property
    def lease(self) -> str:
        """Key in the region's Redis naming the gateway that runs the region's stages (of a
        partition: the gateway that owns the partition)."""
        return f"{self.namespace}:lease{self.suffix}"

    @property
    def handover(self) -> str:
        """Key next to a partition's :attr:`lease`: another gateway asks for the partition."""
        return f"{self.namespace}:handover{self.suffix}"

    @property
    def epoch(self) -> str:
        return f"{self.namespace}:epoch{self.suffix}"

    @property
    def status(self) -> str:
        """Hash: per origin, what this region has applied and how late (read by ``invalgw lag``)."""
        return f"{self.namespace}:status{self.suffix}"

    def keys(self, peers: list[str]) -> list[str]:
        """Every key the gateway keeps for this stream (or partition) in its own Redis, mirrors
        from ``peers`` aside."""
        return [
            self.local_stream,
            self.status,
            self.epoch,
            self.lease,
            self.lost,
            self.dead_letters,
            self.gaps,
            *(self.link(peer) for peer in peers),
        ]
