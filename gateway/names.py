"""Names of the keys and consumer groups the gateway uses, in one place.

Everything the gateway creates lives under the configured namespace (default ``invalgw``). A mirror
stream and its dedup state share a hash tag, so the append script also works on a Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

APPLY_GROUP = "apply"


def forward_group(peer: str) -> str:
    """The consumer group on the local stream that feeds ``peer``."""
    return f"to:{peer}"


@dataclass(frozen=True)
class Names:
    namespace: str
    local_stream: str

    def mirror(self, origin: str) -> str:
        """Stream in this region's Redis holding envelopes from ``origin``."""
        return f"{self.namespace}:mirror:{{{origin}}}"

    def mirror_state(self, origin: str) -> str:
        """Hash next to :meth:`mirror`: the last batch accepted from ``origin`` (for dedup)."""
        return f"{self.namespace}:mirror:{{{origin}}}:state"

    def link(self, peer: str) -> str:
        """Hash in the origin's Redis: what the forwarder has delivered to ``peer``."""
        return f"{self.namespace}:link:{peer}"

    @property
    def dead_letters(self) -> str:
        return f"{self.namespace}:dead"

    @property
    def gaps(self) -> str:
        """Stream of recorded gaps: invalidations a region may have missed."""
        return f"{self.namespace}:gaps"

    @property
    def lost(self) -> str:
        """Hash: per stream and consumer group, the last lost ID already reported as a gap."""
        return f"{self.namespace}:lost"

    @property
    def lease(self) -> str:
        """Key in the region's Redis naming the gateway that runs the region's stages."""
        return f"{self.namespace}:lease"

    @property
    def epoch(self) -> str:
        return f"{self.namespace}:epoch"

    @property
    def status(self) -> str:
        """Hash: per origin, what this region has applied and how late (read by ``invalgw lag``)."""
        return f"{self.namespace}:status"
