"""Race-safe fills: versioned invalidations leave a tombstone that refuses older fills.

The race: region B's service reads an old value from a lagging database replica and writes it back
into the cache just after the invalidation arrived, so the stale value lives on. The fence closes
it. An invalidation may carry the ``version`` of the change (any non-negative integer that grows
with each change of the source: a row version, a commit sequence number). Applying it leaves, next
to the key, a short-lived tombstone holding the highest version seen; :func:`fill` writes a value
only if the version it was read at is not older than the tombstone. Both sides are one atomic
script on the key's own Redis (the tombstone shares the key's hash slot, so it works on a cluster).

::

    from invalgw.fence import fill
    stored = await fill(client, "user:1001:profile", value, version=row.version, ttl_ms=60_000)
    # False: the row changed (and was invalidated) since this value was read: not cached.
"""

from __future__ import annotations

import functools
import itertools
from typing import overload

import redis
import redis.asyncio
from redis.crc import key_slot

from invalgw.connections import AsyncRedis

FENCE_SUFFIX = ":invalgw:fence"

# Versions are compared as canonical decimal strings of any length: shorter is older.
_OLDER = """
local function older(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
"""

APPLY_SCRIPT = (
    _OLDER
    + """
-- KEYS[1] key, KEYS[2] its tombstone; ARGV[1] version, ARGV[2] tombstone ttl ms,
-- ARGV[3] 0 to unlink the key, else a soft expiry in ms (PEXPIRE LT)
local current = redis.call('GET', KEYS[2])
if not current or older(current, ARGV[1]) then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
end
if ARGV[3] == '0' then
  return redis.call('UNLINK', KEYS[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3], 'LT')
return 0
"""
)

FILL_SCRIPT = (
    _OLDER
    + """
-- KEYS[1] key, KEYS[2] its tombstone; ARGV[1] value, ARGV[2] version, ARGV[3] ttl ms
local fence = redis.call('GET', KEYS[2])
if fence and older(ARGV[2], fence) then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""
)


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: its ``{tag}`` if it has one, else all of it."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


@overload
def fence_key(key: str) -> str: ...
@overload
def fence_key(key: bytes) -> bytes: ...
def fence_key(key: str | bytes) -> str | bytes:
    """The tombstone's name: ``{<key's hash tag>}:invalgw:fence:<key>``, in the key's hash slot
    on a Redis Cluster. A key with a ``}`` but no hash tag cannot be wrapped in a tag: its
    tombstone's tag is a short string that hashes to the key's slot. A key given as bytes (found
    by a pattern walk; it need not be UTF-8) gets its tombstone's name as bytes."""
    if isinstance(key, bytes):
        return _fence_key(key.decode(errors="surrogateescape")).encode(errors="surrogateescape")
    return _fence_key(key)


def _fence_key(key: str) -> str:
    tag = hash_tag(key)
    if "}" in tag:
        tag = _slot_tags()[key_slot(key.encode(errors="surrogateescape"))]
    return "{" + tag + "}" + FENCE_SUFFIX + ":" + key


@functools.cache
def _slot_tags() -> list[str]:
    """For each hash slot, the first decimal number that hashes to it (about 110,000 tries,
    0.1 s, once per process and only if such a key comes)."""
    tags: list[str] = [""] * 16384
    missing = len(tags)
    for number in itertools.count():
        slot = key_slot(str(number).encode())
        if not tags[slot]:
            tags[slot] = str(number)
            missing -= 1
            if not missing:
                return tags
    raise AssertionError("unreachable")


def is_fence_key(key: str | bytes) -> bool:
    """Whether ``key`` is a tombstone made by :func:`fence_key`.

    Pattern walks leave tombstones alone: a group pattern such as ``{user:1001}:*`` matches the
    tombstones of the group's keys too, and deleting one would admit stale fills again.
    """
    if isinstance(key, bytes):
        key = key.decode(errors="surrogateescape")
    end = key.find("}")
    marker = FENCE_SUFFIX + ":"
    if not key.startswith("{") or end < 2 or not key.startswith(marker, end + 1):
        return False
    return _fence_key(key[end + 1 + len(marker) :]) == key


def canonical_version(text: str) -> str:
    """Validate a version (decimal digits, no leading zeros); raise ``ValueError`` if it is not."""
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ValueError(f"version {text!r} must be a non-negative integer without leading zeros")
    return text


async def fill(
    client: AsyncRedis, key: str, value: bytes | str, *, version: int | str, ttl_ms: int = 0
) -> bool:
    """Cache ``value`` (read at ``version``) unless a newer invalidation fenced ``key``."""
    script = client.register_script(FILL_SCRIPT)
    stored = await script(
        keys=[key, fence_key(key)], args=[value, canonical_version(str(version)), ttl_ms]
    )
    return bool(stored)


def fill_sync(
    client: redis.Redis, key: str, value: bytes | str, *, version: int | str, ttl_ms: int = 0
) -> bool:
    """:func:`fill` with a blocking client."""
    script = client.register_script(FILL_SCRIPT)
    stored = script(
        keys=[key, fence_key(key)], args=[value, canonical_version(str(version)), ttl_ms]
    )
    return bool(stored)
