"""Envelopes on their way to one peer: appended in order, re-sent from the first unconfirmed one.

Each envelope is one ``FCALL invalgw_append`` on the peer (see :mod:`invalgw.functions`). An
envelope stays in the window until the peer's reply confirms it (appended, or recognised as a
duplicate); after a lost connection or reply the window sends the very same envelopes again, in
order, so the peer's dedup on the last origin ID recognises each one it already has.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from invalgw.connections import AsyncRedis
from invalgw.functions import APPEND, function_missing, load_library
from invalgw.metrics import Metrics
from invalgw.proto import StreamId
from invalgw.stages import Drain

log = logging.getLogger(__name__)

DRAIN_GRACE_S = 1.0
"""How long a drain waits for a call to a peer already under way (a healthy one answers sooner)."""


@dataclass
class Outgoing:
    """One envelope for the peer, and how far it moves the sender's cursor once confirmed."""

    kind: str
    """``batch`` (deduplicated on ``last``), ``notice`` (always appended), or ``""``: nothing to
    send, only a cursor move (entries that were all invalid)."""
    epoch: str
    last: str
    """Origin ID of the last invalidation in the envelope (for a notice, the last one sent)."""
    payload: bytes
    cursor: StreamId
    """The last local stream entry this envelope covers."""
    count: int
    """Local stream entries it covers (valid or not)."""
    events: int = 0
    gap: tuple[str, str] | None = None
    spans: list[Any] = field(default_factory=list)
    ack: list[bytes] = field(default_factory=list)
    """Pending entries of the sender's group to acknowledge once confirmed."""


Confirm = Callable[[Outgoing, bool], Awaitable[None]]
"""Told of each envelope the peer confirmed, in order, and whether it was appended."""


class PeerWindow:
    """The envelopes sent to one peer and not yet confirmed, oldest first."""

    def __init__(
        self,
        *,
        region: str,
        peer: str,
        remote: AsyncRedis,
        mirror_keys: list[str],
        mirror_max_len: int,
        drain: Drain,
        metrics: Metrics,
    ) -> None:
        self.peer = peer
        self.remote = remote
        self.mirror_keys = mirror_keys
        self.mirror_max_len = mirror_max_len
        self.drain = drain
        self.unconfirmed: deque[Outgoing] = deque()
        self._function_warned = False
        self._link_up = metrics.link_up.labels(region, peer)
        self._in_flight = metrics.in_flight.labels(region, peer)

    def __len__(self) -> int:
        return len(self.unconfirmed)

    def add(self, out: Outgoing) -> None:
        """Queue ``out``; a cursor move only joins the envelope before it, if there is one."""
        if not out.kind and self.unconfirmed:
            before = self.unconfirmed[-1]
            before.cursor, before.count = out.cursor, before.count + out.count
            before.ack += out.ack
            return
        self.unconfirmed.append(out)

    def clear(self) -> None:
        self.unconfirmed.clear()

    async def flush(self, confirm: Confirm) -> bool:
        """Send every unconfirmed envelope in order; False if a drain gave up on the peer."""
        while self.unconfirmed:
            out = self.unconfirmed[0]
            appended = True
            if out.kind:
                reply = await self._call(out)
                if reply is None:
                    return False
                appended = reply[0] == b"ok"
            self.unconfirmed.popleft()
            await confirm(out, appended)
        return True

    async def _call(self, out: Outgoing) -> Any:
        """One append on the peer; None if a drain gave up waiting for the peer."""
        args = [*self.mirror_keys, out.kind, out.epoch, out.last, out.payload, self.mirror_max_len]
        self._in_flight.inc()
        with self.drain.interruptible(DRAIN_GRACE_S) as call:
            try:
                reply = await self._append(args)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._link_up.set(0)
                raise
            finally:
                self._in_flight.dec()
        if call.cancelled_caught:
            log.warning("%s: draining: gave up waiting; sent again after a restart", self.peer)
            return None
        self._link_up.set(1)
        return reply

    async def _append(self, args: list[Any]) -> Any:
        """``FCALL invalgw_append`` on the peer; where the peer lacks the library (its gateway has
        not started yet), load it there if this credential may, else say so once."""
        try:
            return await self.remote.fcall(APPEND, 2, *args)
        except redis.ResponseError as exc:
            if not function_missing(exc):
                raise
            try:
                await load_library(self.remote)
            except redis.ResponseError as refused:
                level = logging.DEBUG if self._function_warned else logging.WARNING
                self._function_warned = True
                log.log(
                    level,
                    "peer %s has no invalgw function yet: its gateway loads it at start (%s)",
                    self.peer,
                    refused,
                )
                raise exc from None
        return await self.remote.fcall(APPEND, 2, *args)
