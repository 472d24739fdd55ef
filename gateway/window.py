"""Envelopes on their way to one peer: pipelined in order, re-sent from the first unconfirmed one.

Each envelope is one ``FCALL invalgw_append`` on the peer (see :mod:`invalgw.functions`). While a
session is open, envelopes are written on one connection as they come, up to ``size`` without a
reply, and a reader task takes the replies in order: a new batch never waits for the previous
one's reply, and Redis appends them in the order written. An envelope stays in the window until
the peer's reply confirms it (appended, or recognised as a duplicate); after a lost connection or
reply the next session writes the very same envelopes again, in order, so the peer's dedup on the
last origin ID recognises each one it already has.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import redis

from invalgw.connections import AsyncRedis
from invalgw.functions import APPEND, function_missing, load_library
from invalgw.metrics import Metrics
from invalgw.proto import StreamId
from invalgw.stages import Drain

log = logging.getLogger(__name__)

DRAIN_GRACE_S = 1.0
"""How long a drain waits for a call to a peer already under way (a healthy one answers sooner)."""

COMMIT_EVERY = 8
"""Confirmed envelopes saved together at most ..."""
COMMIT_DELAY_S = 0.1
"""... or once no reply has been due for this long (so a quiet link saves once, not per batch)."""


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
    prev: str | None = None
    """The origin ID the peer must hold before this envelope (None: no such check)."""
    gap: tuple[str, str] | None = None
    spans: list[Any] = field(default_factory=list)
    ack: list[bytes] = field(default_factory=list)
    """Pending entries of the sender's group to acknowledge once confirmed."""


class PeerBehind(redis.RedisError):
    """The peer holds less than the envelopes it confirmed: its Redis lost some."""


class Resend(Exception):
    """The session must start again and send the unconfirmed envelopes again (no failure)."""


Confirm = Callable[[Outgoing, bool], None]
"""Told of each envelope the peer confirmed, in order, and whether it was appended."""

Commit = Callable[[], Awaitable[None]]
"""Saves what the confirmations so far changed (one round trip for several of them)."""


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
        size: int = 16,
    ) -> None:
        self.peer = peer
        self.remote = remote
        """The peer's client (of the node serving the mirror stream: see ``Forwarder.reroute``)."""
        self._pool = remote.connection_pool
        self.mirror_keys = mirror_keys
        self.mirror_max_len = mirror_max_len
        self.drain = drain
        self.size = size
        self.unconfirmed: deque[Outgoing] = deque()
        self._written = 0
        """How many of :attr:`unconfirmed` (the oldest) went out on the open connection."""
        self._connection: Any = None
        self._sent = anyio.Event()
        """Set when an envelope was written (the reader waits for one)."""
        self._answered = anyio.Event()
        """Set when a reply came (the writer waits for room)."""
        self._writing = anyio.Lock(fast_acquire=True)  # no trip through the loop when free
        self._function_warned = False
        self._link_up = metrics.link_up.labels(region, peer)
        self._in_flight = metrics.in_flight.labels(region, peer)
        self._connection_errors = metrics.connection_errors.labels(region, peer)

    def __len__(self) -> int:
        return len(self.unconfirmed)

    @property
    def is_open(self) -> bool:
        return self._connection is not None

    def add(self, out: Outgoing) -> None:
        """Queue ``out``; a cursor move only joins the envelope before it, if there is one."""
        if not out.kind and self.unconfirmed:
            before = self.unconfirmed[-1]
            before.cursor, before.count = out.cursor, before.count + out.count
            before.ack += out.ack
            return
        self.unconfirmed.append(out)

    @property
    def full(self) -> bool:
        return len(self.unconfirmed) >= self.size

    def keep_epoch(self, epoch: str) -> None:
        """Drop the envelopes of another epoch (not written yet on any open connection)."""
        if any(out.epoch != epoch for out in self.unconfirmed):
            self.unconfirmed = deque(out for out in self.unconfirmed if out.epoch == epoch)

    def clear(self) -> None:
        self.unconfirmed.clear()
        self._written = 0
        self._in_flight.set(0)

    async def room(self) -> None:
        """Wait until the window has room for one more envelope."""
        while self.full:
            await self._wait_answer()

    async def _wait_answer(self) -> None:
        self._answered = anyio.Event()
        await self._answered.wait()

    # -- a session: one connection, writes and a reader of replies ------------------------------

    async def open(self) -> None:
        """Take a connection of its own and write every unconfirmed envelope on it again."""
        self._pool = self.remote.connection_pool  # the remote may change between sessions
        try:
            self._connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._link_up.set(0)
            raise
        self._written = 0
        await self.send()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._written = 0
        self._in_flight.set(0)
        if connection is not None:
            with anyio.move_on_after(1, shield=True):
                await connection.disconnect()  # replies may be left unread: never reuse it
                await self._pool.release(connection)

    async def send(self) -> None:
        """Write the envelopes not yet written, as far as the window allows."""
        async with self._writing:
            while self._connection is not None and self._written < min(
                len(self.unconfirmed), self.size
            ):
                out = self.unconfirmed[self._written]
                self._written += 1
                self._in_flight.set(self._written)
                if out.kind:
                    command = self._connection.pack_command("FCALL", APPEND, 2, *self._args(out))
                    try:
                        await self._connection.send_packed_command(command, check_health=False)
                    except (redis.ConnectionError, redis.TimeoutError, OSError):
                        self._lost()
                        raise
                    except AttributeError:  # the reply reader saw the connection fail and
                        self._lost()  # redis-py dropped its socket under this write
                        raise redis.ConnectionError(f"connection to {self.peer} lost") from None
                self._sent.set()

    def _lost(self) -> None:
        """The session's connection failed: the link is down, and the error is counted (its
        raw writes and reads go around the client's retry, which counts the others)."""
        self._link_up.set(0)
        self._connection_errors.inc()

    async def serve(self, confirm: Confirm, commit: Commit) -> None:
        """Take the peer's replies in order, until cancelled (or the connection fails)."""
        uncommitted = 0
        while True:
            if not self._written:
                self._sent = anyio.Event()
                with anyio.move_on_after(COMMIT_DELAY_S if uncommitted else math.inf):
                    await self._sent.wait()
                if not self._written:
                    await _shielded(commit)
                    uncommitted = 0
                continue
            out = self.unconfirmed[0]
            appended = True
            if out.kind:
                appended = await self._reply(out)
            self.unconfirmed.popleft()
            self._written -= 1
            self._in_flight.set(self._written)
            confirm(out, appended)
            uncommitted += 1
            if uncommitted >= COMMIT_EVERY:
                await _shielded(commit)
                uncommitted = 0
            self._answered.set()
            await self.send()

    async def _reply(self, out: Outgoing) -> bool:
        """The peer's answer for ``out``: whether it appended it (False: it already had it)."""
        try:
            reply = await self._connection.read_response()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._lost()
            raise
        except redis.ResponseError as exc:
            if function_missing(exc):  # the peer's gateway has not started yet
                await self._load_function(exc)
                raise Resend from None  # the envelopes after it were refused: all again
            raise
        self._link_up.set(1)
        return self._appended(out, reply)

    def _appended(self, out: Outgoing, reply: Any) -> bool:
        if reply[0] == b"behind":
            # Every envelope before this one was confirmed, yet the peer holds less: its Redis
            # lost them. Sent again without the check, its receiver records the gap.
            log.warning(
                "%s: the peer holds origin IDs up to %s only, not %s: it lost envelopes",
                self.peer,
                reply[1].decode(),
                out.prev,
            )
            lost, out.prev = out.prev, None
            raise PeerBehind(f"peer {self.peer} lost envelopes up to {lost}")
        return bool(reply[0] == b"ok")

    async def settle(self) -> None:
        """At a drain: wait a little for the replies to what was written."""
        with anyio.move_on_after(DRAIN_GRACE_S):
            while self._written:
                await self._wait_answer()
        if self._written:
            log.warning("%s: draining: gave up waiting; sent again after a restart", self.peer)

    # -- without a session: one call at a time (tests, tools) -----------------------------------

    async def flush(self, confirm: Confirm, commit: Commit) -> bool:
        """Send every unconfirmed envelope in order; False if a drain gave up on the peer."""
        while self.unconfirmed:
            out = self.unconfirmed[0]
            appended = True
            if out.kind:
                reply = await self._call(out)
                if reply is None:
                    return False
                appended = self._appended(out, reply)
            self.unconfirmed.popleft()
            confirm(out, appended)
            await commit()
        return True

    def _args(self, out: Outgoing) -> list[Any]:
        args = [*self.mirror_keys, out.kind, out.epoch, out.last, out.payload, self.mirror_max_len]
        return args if out.prev is None else [*args, out.prev]

    async def _call(self, out: Outgoing) -> Any:
        """One append on the peer; None if a drain gave up waiting for the peer."""
        self._in_flight.inc()
        with self.drain.interruptible(DRAIN_GRACE_S) as call:
            try:
                reply = await self._append(self._args(out))
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
        try:
            return await self.remote.fcall(APPEND, 2, *args)
        except redis.ResponseError as exc:
            if not function_missing(exc):
                raise
            await self._load_function(exc)
        return await self.remote.fcall(APPEND, 2, *args)

    async def _load_function(self, missing: redis.ResponseError) -> None:
        """The peer lacks the library (its gateway has not started yet): load it there if this
        credential may, else say so once and raise ``missing``."""
        try:
            await load_library(self.remote)
        except redis.ResponseError as refused:
            level = logging.DEBUG if self._function_warned else logging.WARNING
            self._function_warned = True
            why = str(refused)
            if isinstance(refused, redis.exceptions.NoPermissionError):
                why = "a peer's credential may not load one, by design"  # see invalgw acl
            log.log(
                level,
                "peer %s has no invalgw function yet: its gateway loads it at start (%s)",
                self.peer,
                why,
            )
            raise missing from None


async def _shielded(commit: Commit) -> None:
    """Save without being cut short by a drain's cancellation (a local call, quick)."""
    with anyio.CancelScope(shield=True):
        await commit()
