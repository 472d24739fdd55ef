"""Partition leases: gateway processes of one region share its partitions, one owner each.

Each partition ``p`` has a lease, the key ``<namespace>:lease:{<stream>:p}`` in the partition's
slot, holding ``<consumer> <token>`` with a TTL of ``gateway.lease_ms``. Every process runs
:meth:`PartitionLeases.round` every third of the TTL (Kinesis Client Library style):

- renew the leases it holds; one it finds taken, or cannot renew for half the TTL, it stops
  using at once (the others may act only once the TTL has passed since its last renewal);
- count the live holders (this process included) and the fair share, ``ceil(P / holders)``;
- take free or expired leases up to its share (and its own back at once: a lease it stopped
  using when renewals failed, that nobody took meanwhile);
- below its share with none free, ask the most loaded holder (above the share, or at it while
  this one is two below) for one partition: it sets ``<namespace>:handover:{<stream>:p}``; the
  holder sees it at its next round, stops the partition, and releases the lease, which the
  asker then takes as free. One partition per round, so a rebalance never stops everything.

A draining process stops its partitions and releases their leases at once.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass, field

from invalgw.connections import REDIS_ERRORS, AsyncRedis
from invalgw.lease import RELEASE

log = logging.getLogger(__name__)

# One key each: while a slot migrates, Redis refuses a script naming two keys of it when one of
# them (the hand-over request, usually absent) is not on the node (TRYAGAIN), which would stall
# every renewal for the whole migration. A lease still holding this process's own value (it
# stopped the partition when renewals failed, and nobody took it since) is taken back at once.
_TAKE = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


@dataclass
class Lease:
    partition: int
    key: str
    handover_key: str
    client: AsyncRedis
    renewed: float = 0.0
    """Local monotonic time of the last renewal (or take) that succeeded."""


@dataclass
class Round:
    """What one round decided: partitions to start, and to stop (lost, or handed over)."""

    start: list[int] = field(default_factory=list)
    stop: list[int] = field(default_factory=list)
    failed: list[Exception] = field(default_factory=list)
    """Errors of the leases whose node did not answer: the round went on with the others."""


class PartitionLeases:
    def __init__(self, leases: list[Lease], consumer: str, *, ttl_ms: int) -> None:
        self.leases = leases
        self.ttl_ms = ttl_ms
        self.value = f"{consumer} {secrets.token_hex(6)}"
        self.held: set[int] = set()
        self.handing_over: set[int] = set()
        """Partitions another process asked for: stopped, then released."""

    @property
    def interval_s(self) -> float:
        return self.ttl_ms / 3000

    async def round(self) -> Round:
        """Renew, then take or ask for partitions up to the fair share."""
        decided = Round()
        holders: dict[str, list[int]] = {}
        unknown: set[int] = set()
        for lease in self.leases:
            try:
                await self._look(lease, decided, holders)
            except REDIS_ERRORS as exc:  # its node does not answer: the others go on
                decided.failed.append(exc)
                unknown.add(lease.partition)
        holders.setdefault(self.value, [])
        share = math.ceil(len(self.leases) / len(holders))
        mine = len(self.held)
        for lease in self.leases:
            if mine >= share:
                break
            if lease.partition in self.held | unknown or any(
                lease.partition in held for held in holders.values()
            ):
                continue
            try:
                took = await self._take(lease)
            except REDIS_ERRORS as exc:
                decided.failed.append(exc)
                continue
            if took:
                decided.start.append(lease.partition)
                mine += 1
        if mine < share:
            try:
                await self._ask(holders, share, mine)
            except REDIS_ERRORS as exc:
                decided.failed.append(exc)
        return decided

    async def _look(self, lease: Lease, decided: Round, holders: dict[str, list[int]]) -> None:
        """Renew ``lease`` if held (stopping it if lost, handed over or stale), else note its
        holder."""
        p = lease.partition
        if p in self.held:
            ok, wanted = await self._renew(lease)
            holders.setdefault(self.value, []).append(p)  # until stopped and released
            if not ok or wanted is not None:
                self.held.discard(p)
                decided.stop.append(p)
                if ok:  # handed over: released once stopped (see release)
                    self.handing_over.add(p)
                    log.info("partition %d: handing over to %s", p, wanted)
                else:
                    log.warning("partition %d: lease lost; stopped using it", p)
            return
        holder = await lease.client.get(lease.key)
        if isinstance(holder, bytes) and holder.decode() != self.value:  # ours: taken back
            holders.setdefault(holder.decode(), []).append(p)

    async def _renew(self, lease: Lease) -> tuple[bool, str | None]:
        try:
            ok = int(await lease.client.eval(_RENEW, 1, lease.key, self.value, self.ttl_ms))
        except REDIS_ERRORS:
            if time.monotonic() - lease.renewed > self.ttl_ms / 2000:
                return False, None  # stale: others may take it soon; stop first
            return True, None
        if not ok:
            return False, None
        lease.renewed = time.monotonic()
        try:
            wanted = await lease.client.get(lease.handover_key)
        except REDIS_ERRORS:  # (ASK while its slot migrates): asked again next round
            wanted = None
        return True, wanted.decode() if isinstance(wanted, bytes) else None

    async def _take(self, lease: Lease) -> bool:
        took = await lease.client.eval(_TAKE, 1, lease.key, self.value, self.ttl_ms)
        if not int(took):
            return False
        lease.renewed = time.monotonic()
        self.held.add(lease.partition)
        try:
            await lease.client.delete(lease.handover_key)  # a request to its last holder is done
        except REDIS_ERRORS as exc:  # the lease is ours all the same: run the partition
            log.debug("partition %d: hand-over request not cleared: %s", lease.partition, exc)
        return True

    async def _ask(self, holders: dict[str, list[int]], share: int, mine: int) -> None:
        """Ask the most loaded holder for one of its partitions."""
        others = [(len(held), value) for value, held in holders.items() if value != self.value]
        if not others:
            return
        count, victim = max(others)
        if count > share or (count == share and mine < share - 1):
            lease = self.leases[holders[victim][0]]
            await lease.client.set(lease.handover_key, self.value, px=self.ttl_ms, nx=True)

    def renewed_lately(self, partition: int) -> bool:
        """``partition``'s lease renewed within half the TTL: nobody else can have taken it."""
        return time.monotonic() - self.leases[partition].renewed < self.ttl_ms / 2000

    async def release(self, partition: int) -> None:
        """Release ``partition``'s lease (after stopping it), for another process to take."""
        lease = self.leases[partition]
        self.held.discard(partition)
        self.handing_over.discard(partition)
        await lease.client.delete(lease.handover_key)
        await lease.client.eval(RELEASE, 1, lease.key, self.value)
