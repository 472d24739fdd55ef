"""The Redis Function library ``invalgw``: what a peer may run in this region's Redis.

A peer appends an envelope to its mirror stream here with ``FCALL invalgw_append``. Each region's
gateway loads the library into its own Redis at start (``FUNCTION LOAD REPLACE``), so a peer's
credential needs ``FCALL`` and nothing that runs code of its own choosing (``SCRIPT LOAD`` or
``EVAL`` would let it run any Lua, and block the Redis).

``invalgw_append`` (keys: the mirror stream, its state hash; args: ``batch`` or ``notice``, the
origin's epoch, the last origin ID in the envelope, the envelope, the mirror stream's max length,
and optionally the origin ID the envelope follows) appends the envelope, except:

- a batch whose last origin ID the state hash already holds in that epoch: ``duplicate`` (a batch
  re-sent after a crash or a lost reply);
- an envelope that follows an origin ID beyond the one held in that epoch: ``behind`` (an earlier
  envelope pipelined before it failed, so it is refused too and both are sent again in order).

Answers ``{'ok'|'duplicate'|'behind', last origin ID held}``.

``invalgw_clear_gap`` (key: the sender's link state; args: the gap delivered) forgets a gap the
peer was told of, unless another one was noted meanwhile.
"""

from __future__ import annotations

import redis

from invalgw.connections import AsyncRedis

LIBRARY = "invalgw"
APPEND = "invalgw_append"
CLEAR_GAP = "invalgw_clear_gap"

SOURCE = """#!lua name=invalgw
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function before(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end

local function append(keys, args)
  local epoch = redis.call('HGET', keys[2], 'epoch')
  local last = redis.call('HGET', keys[2], 'last')
  local known = epoch == args[2] and last
  if args[1] == 'batch' and known and not before(last, args[3]) then
    return {'duplicate', last}
  end
  if known and args[6] and before(last, args[6]) then
    return {'behind', last}
  end
  redis.call('XADD', keys[1], 'MAXLEN', '~', args[5], '*', 'd', args[4])
  if args[1] == 'batch' then
    redis.call('HSET', keys[2], 'epoch', args[2], 'last', args[3])
    return {'ok', args[3]}
  end
  return {'ok', last or '0-0'}
end

local function clear_gap(keys, args)
  if redis.call('HGET', keys[1], 'gap_after') == args[1]
      and redis.call('HGET', keys[1], 'gap_upto') == args[2] then
    return redis.call('HDEL', keys[1], 'gap_after', 'gap_upto')
  end
  return 0
end

redis.register_function('invalgw_append', append)
redis.register_function('invalgw_clear_gap', clear_gap)
"""


async def load_library(client: AsyncRedis) -> None:
    """Load (or replace with this version) the library into ``client``'s Redis."""
    await client.function_load(SOURCE, replace=True)


def function_missing(exc: redis.ResponseError) -> bool:
    """The Redis answered that it has no such function (the library is not loaded there)."""
    return "function not found" in str(exc).lower()
