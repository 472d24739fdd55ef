"""The epoch of a region's invalidation stream.

The epoch is a random token kept in the region's Redis. It changes when the stream's history is
lost: the key vanished with a Redis restart without persistence, or a consumer group had to be
recreated. Envelopes carry it, so a receiver can tell "nothing happened" from "history was lost".
"""

from __future__ import annotations

import logging
import secrets

from invalgw.connections import AsyncRedis

log = logging.getLogger(__name__)

_ROTATE = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return current
"""


class Epoch:
    def __init__(self, client: AsyncRedis, key: str) -> None:
        self.client = client
        self.key = key
        self.value = ""
        self._rotate = client.register_script(_ROTATE)

    async def load(self) -> str:
        """Read the epoch, creating one if the region has none yet."""
        await self.client.set(self.key, secrets.token_hex(8), nx=True)
        raw = await self.client.get(self.key)
        self.value = raw.decode() if isinstance(raw, bytes) else secrets.token_hex(8)
        return self.value

    async def rotate(self, seen: str) -> str:
        """Start a new epoch unless another stage already did since ``seen`` was read."""
        result = await self._rotate(keys=[self.key], args=[seen, secrets.token_hex(8)])
        new = result.decode() if isinstance(result, bytes) else str(result)
        if new != self.value:
            log.warning("stream history was lost; new epoch %s (was %s)", new, self.value)
        self.value = new
        return new


class EpochWatch:
    """One reader of the local stream: starts a new epoch when its group was lost, once per loss.

    A lost stream (Redis restarted empty, or the key deleted) is noticed by every group of the
    stream, one after the other. Each reader remembers the epoch it last read in; the first one
    to notice the loss rotates, the others find the epoch already changed and keep it.
    """

    def __init__(self, epoch: Epoch) -> None:
        self.epoch = epoch
        self.seen = epoch.value

    def read_ok(self) -> None:
        self.seen = self.epoch.value

    async def history_lost(self) -> None:
        self.seen = await self.epoch.rotate(self.seen)
