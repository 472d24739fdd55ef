"""Gaps: invalidations a region may have missed, recorded and never silently skipped.

A gap happens when an origin lost its stream (new epoch), when the origin trimmed entries a peer
had not received (the hard cap on memory), or when mirror entries were lost before being applied.
Each gap goes to the stream ``<namespace>:gaps`` with its origin, reason and ID range, raises
``invalgw_gaps_total`` and is logged as a warning. The operator's resync follows from there.
"""

from __future__ import annotations

import logging
import time

from gateway.connections import AsyncRedis
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

GAPS_MAX_LEN = 10_000


class Gaps:
    def __init__(self, client: AsyncRedis, stream: str, *, region: str, metrics: Metrics) -> None:
        self.client = client
        self.stream = stream
        self.region = region
        self.metrics = metrics

    async def record(self, origin: str, reason: str, *, after: str, upto: str) -> None:
        """Record that invalidations from ``origin`` in (``after``, ``upto``] may be lost."""
        log.warning(
            "gap: invalidations from %s after %s up to %s may be missing in %s: %s",
            origin,
            after,
            upto,
            self.region,
            reason,
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
