"""The in-memory feed: batches the local apply read and parsed, handed on to every peer's sender.

The local stream is read once per batch (by the ``apply`` group) and parsed once. Each applied
batch is offered to every sender that keeps up; a sender whose bounded queue is full drops out of
the feed and catches up by reading the stream itself from its durable cursor, then joins again.

A batch says which entry it follows (``after``): the last entry of the previous read of new
entries. A sender takes a batch from the feed only if that entry is at or before its own position,
so joining the feed again, or a read that was not contiguous (pending entries read again after a
failure, or taken over from a dead consumer), never skips an entry: the sender reads what lies in
between from the stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import anyio
import msgspec

from invalgw.proto import Invalidation, StreamId
from invalgw.read import Entry


@dataclass(frozen=True)
class FedBatch:
    """One batch of the local stream, as the local apply read and parsed it."""

    after: StreamId | None
    """The entry this batch directly follows in the stream; None if not known (not contiguous)."""
    last: StreamId
    """The batch's last entry (valid or not)."""
    entries: Sequence[Entry]
    """Every entry of the batch, in order (valid or not): a sender's cursor counts them."""
    events: Sequence[Invalidation]
    """The valid invalidations, in order (invalid entries were dead-lettered by the local apply)."""

    @cached_property
    def traced(self) -> bool:
        """Whether any event carries a trace context (then each peer's send is traced)."""
        return any(event.traceparent for event in self.events)

    @cached_property
    def encoded_events(self) -> msgspec.Raw:
        """:attr:`events` as they go into an envelope, encoded once for every peer."""
        return msgspec.Raw(_encoder.encode(self.events))


_encoder = msgspec.msgpack.Encoder()


def merged(first: FedBatch, following: FedBatch) -> FedBatch:
    """``first`` and the batch that directly follows it in the stream, as one batch."""
    return FedBatch(
        after=first.after,
        last=following.last,
        entries=[*first.entries, *following.entries],
        events=[*first.events, *following.events],
    )


class Subscription:
    """One sender's place in the feed: a bounded queue, or dropped out when it overflowed."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.dropped = True
        """Out of the feed (not joined yet, or its queue overflowed): batches are not kept."""
        self._queue: deque[FedBatch] = deque()
        self._ready = anyio.Event()

    def offer(self, batch: FedBatch) -> None:
        """Queue ``batch``; never waits: a full queue drops the subscription out of the feed."""
        if self.dropped:
            return
        if len(self._queue) >= self.bound:
            self.dropped = True
            self._queue.clear()
        else:
            self._queue.append(batch)
        self._ready.set()

    def join(self) -> None:
        """Take batches from now on (the caller reads what came before from the stream)."""
        self._queue.clear()
        self.dropped = False

    def leave(self) -> None:
        self.dropped = True
        self._queue.clear()

    def take_following(self, batch: FedBatch, most: int) -> FedBatch:
        """``batch`` merged with the queued batches that directly follow it, while the entries
        stay at most ``most``: a sender whose window was full then sends what queued meanwhile
        as one envelope, not one per read of the local apply."""
        while self._queue:
            following = self._queue[0]
            if following.after != batch.last or len(batch.entries) + len(following.entries) > most:
                break
            self._queue.popleft()
            batch = merged(batch, following)
        return batch

    def get_nowait(self) -> FedBatch | None:
        return self._queue.popleft() if self._queue else None

    async def get(self) -> FedBatch | None:
        """The next batch; None once the subscription dropped out of the feed."""
        while not self._queue:
            if self.dropped:
                return None
            self._ready = anyio.Event()
            await self._ready.wait()
        return self._queue.popleft()


class Feed:
    """Hands each batch the local apply handled to every subscribed sender, in process."""

    def __init__(self) -> None:
        self.subscriptions: list[Subscription] = []

    def subscribe(self, bound: int) -> Subscription:
        subscription = Subscription(bound)
        self.subscriptions.append(subscription)
        return subscription

    def publish(
        self, after: bytes | None, entries: Sequence[Entry], events: Sequence[Invalidation]
    ) -> None:
        """Offer a batch the local apply handled: ``entries`` as read, ``events`` the valid ones."""
        if not entries or not self.subscriptions:
            return
        batch = FedBatch(
            after=None if after is None else StreamId.parse(after),
            last=StreamId.parse(entries[-1][0]),
            entries=entries,
            events=events,
        )
        for subscription in self.subscriptions:
            subscription.offer(batch)
