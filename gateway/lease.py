"""The region lease: one gateway of a region runs its stages at a time; others wait as standbys.

Two gateways forwarding the same region's stream to the same peer could make the peer's dedup
drop a batch (the later one lands first, the earlier one looks re-sent). So a gateway first takes
the region's lease, a key in the region's Redis holding ``<consumer> <token>``, set with a TTL
and renewed at a third of it. Another gateway finds it held and waits: a standby that takes over
when the holder drains (it releases the lease) or dies (the lease expires). A gateway restarted
in the same deployment slot (same consumer name) takes its lease over at once. A holder that
finds its lease taken stops at once: another gateway may already be forwarding. While the
region's Redis does not answer, nothing can take it over there, and the holder keeps trying.
"""

from __future__ import annotations

import logging
import secrets
import time

from invalgw.connections import AsyncRedis

log = logging.getLogger(__name__)

_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current == false or string.sub(current, 1, #ARGV[2] + 1) == ARGV[2] .. ' ' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 1
end
return current
"""

_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] or current == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

RELEASE = """
-- delete the lease if it still holds this holder (both lease kinds)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RegionLease:
    def __init__(self, client: AsyncRedis, key: str, consumer: str, *, ttl_ms: int) -> None:
        self.key = key
        self.consumer = consumer
        self.ttl_ms = ttl_ms
        self.value = f"{consumer} {secrets.token_hex(6)}"
        self.renewed = 0.0
        """Local monotonic time of the last take or renewal that succeeded."""
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(RELEASE)

    @property
    def renew_interval_s(self) -> float:
        return self.ttl_ms / 3000

    async def try_acquire(self) -> str | None:
        """Take the lease; None on success, else who holds it (``<consumer> <token>``)."""
        reply = await self._acquire(keys=[self.key], args=[self.value, self.consumer, self.ttl_ms])
        if reply == 1:
            self.renewed = time.monotonic()
            return None
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    async def renew(self) -> bool:
        """Extend the lease; False if another gateway holds it now.

        A lease that vanished (the region's Redis restarted empty) is simply taken again: no
        other gateway holds it, so this one still runs alone."""
        ours = await self._renew(keys=[self.key], args=[self.value, self.ttl_ms]) == 1
        if ours:
            self.renewed = time.monotonic()
        return bool(ours)

    def renewed_lately(self) -> bool:
        """Renewed within half the TTL: no other gateway can have taken the lease yet."""
        return time.monotonic() - self.renewed < self.ttl_ms / 2000

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.value])
