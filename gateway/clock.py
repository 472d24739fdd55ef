"""Redis server clocks seen from this host, NTP-style.

Lag is measured on server clocks: the origin Redis stamped each invalidation (its stream ID's
millisecond part), and the gateway compares that stamp with the origin's clock *now*. It knows the
origin's clock through an offset against this host's monotonic clock, sampled with TIME and kept
from the round trip with the least delay, so a host wall clock that is wrong, or jumps, cannot
distort the figures.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from invalgw.connections import AsyncRedis

Monotonic = Callable[[], float]


class ServerClock:
    """The offset between one Redis server's clock and the local monotonic clock."""

    def __init__(self, *, window: int = 8, monotonic: Monotonic = time.monotonic) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)  # (rtt, offset) in ms
        self._monotonic = monotonic

    async def sample(self, client: AsyncRedis) -> None:
        """Take one TIME sample; raises the client's errors if the server cannot be reached."""
        sent = self._monotonic()
        seconds, micros = await client.time()
        received = self._monotonic()
        server_ms = seconds * 1000 + micros / 1000
        midpoint_ms = (sent + received) * 500
        self._samples.append(((received - sent) * 1000, server_ms - midpoint_ms))

    @property
    def synced(self) -> bool:
        return bool(self._samples)

    @property
    def offset_ms(self) -> float:
        """Server clock minus local monotonic clock, in ms, from the least-delayed sample."""
        if not self._samples:
            raise LookupError("no TIME sample yet")
        return min(self._samples)[1]

    def now_ms(self) -> float:
        """The server's clock now, in ms since the Unix epoch."""
        return self._monotonic() * 1000 + self.offset_ms


async def sample_clock(clock: ServerClock, client: AsyncRedis, samples: int = 3) -> None:
    """A few TIME samples in a row; the least-delayed one wins."""
    for _ in range(samples):
        await clock.sample(client)
