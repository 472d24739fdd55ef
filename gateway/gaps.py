"""Gaps: invalidations a region may have missed, recorded and never silently skipped.

A gap happens when an origin lost its stream (new epoch), when the origin trimmed entries a peer
had not received (the hard cap on memory), or when mirror entries were lost before being applied.
Each gap goes to the stream ``<namespace>:gaps`` with its origin, reason and ID range, raises
``invalgw_gaps_total`` and is logged as a warning. Then the resync runs: the region soft-expires
the key patterns its policy names (``policy.resync_patterns``), staggered like any soft
invalidation, so whatever the lost invalidations would have removed goes within the window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from invalgw.connections import AsyncRedis
from invalgw.metrics import Metrics

log = logging.getLogger(__name__)

GAPS_MAX_LEN = 10_000


class Gaps:
    def __init__(
        self,
        client: AsyncRedis,
        stream: str,
        *,
        region: str,
        metrics: Metrics,
        resync: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.stream = stream
        self.region = region
        self.metrics = metrics
        self.resync = resync
        """Called with the origin after each recorded gap: starts the configured resync."""

    async def record(self, origin: str, reason: str, *, after: str, upto: str) -> None:
        """Record that invalidations from ``origin`` in (``after``, ``upto``] may be lost."""
        log.warning(
            "gap: invalidations from %s after %s up to %s may be missing in %s: %s",
            origin,
            after,
            upto,
            self.region,
            reason,
            extra={"origin": origin, "after": after, "upto": upto, "reason": reason},
        )
        self.metrics.gaps.labels(self.region, origin).inc()
        await self.client.xadd(
            self.stream,
            {
                "origin": origin,
                "region": self.region,
                "reason": reason,
                "after": after,
                "upto": upto,
                "recorded_ms": str(int(time.time() * 1000)),
            },
            maxlen=GAPS_MAX_LEN,
            approximate=True,
        )
        if self.resync is not None:
            self.resync(origin)
