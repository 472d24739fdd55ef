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

The gateway's own writes that move a stream's progress go through two more functions, fenced by
the lease of the stream (or partition): each first checks that the lease key (``KEYS[1]``)
holds this gateway's ``<consumer> <token>`` (``ARGV[1]``) and otherwise does nothing and answers
an error starting ``FENCED``. A gateway that stalled past its lease (a long pause, a partition
from its Redis) and comes back with a batch in hand cannot acknowledge it or overwrite the
status once the lease expired, whoever holds it next. An empty ``ARGV[1]`` skips the check (a
mirror stream on another node of a Redis Cluster than the lease: see
:class:`invalgw.apply.ApplyContext`). A sender's cursor never moves back through
``invalgw_cursor`` (a gateway that took the lease over again after a stall, with an older
position in memory, leaves the newer one); only the start-up takeover of dead consumers' pending
entries moves it back, on purpose. Both may run while the Redis is out of memory: they free
more than they take.

- ``invalgw_ack`` (keys: lease, stream, status hash; args: holder, group, status field,
  status, IDs to acknowledge) acknowledges the IDs and saves the status. The keys a batch
  unlinks in the same Redis go in the same transaction, before it, as plain ``UNLINK``: one
  refused would still have been right to remove, and passing every key through Lua doubled
  what the Redis spent on the acknowledgement.
- ``invalgw_cursor`` (keys: lease, stream, link state; args: holder, group, cursor ID, entries
  read, delivered gap's after and upto IDs or empty, number of link state fields, the fields and
  values, IDs to acknowledge) saves a sender's link state and moves its cursor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import redis

from invalgw.connections import AsyncRedis, Lane, call

T = TypeVar("T")

LIBRARY = "invalgw"
APPEND = "invalgw_append"
CLEAR_GAP = "invalgw_clear_gap"
ACK = "invalgw_ack"
SAVE_CURSOR = "invalgw_cursor"
FENCED = "FENCED"
"""How a fenced function's refusal starts: the lease is another gateway's now."""

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

local function refused(keys, args)
  if args[1] ~= '' and redis.call('GET', keys[1]) ~= args[1] then
    return redis.error_reply(
      'FENCED the lease ' .. keys[1] .. ' is held by another gateway, or expired')
  end
  return false
end

-- XACK of the IDs args[first..], in slices the Lua stack can hold.
local function xack(stream, group, args, first)
  for i = first, #args, 1000 do
    redis.call('XACK', stream, group, unpack(args, i, math.min(i + 999, #args)))
  end
end

local function ack(keys, args)
  local refusal = refused(keys, args)
  if refusal then return refusal end
  xack(keys[2], args[2], args, 5)
  redis.call('HSET', keys[3], args[3], args[4])
  return 1
end

local function delivered(stream, group)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if groups['err'] then return nil end  -- no stream: SETID says so
  for _, info in ipairs(groups) do
    local fields = {}
    for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
    if fields['name'] == group then return fields['last-delivered-id'] end
  end
  return nil
end

local function save_cursor(keys, args)
  local refusal = refused(keys, args)
  if refusal then return refusal end
  local last_field = 7 + 2 * tonumber(args[7])
  if last_field > 7 then
    redis.call('HSET', keys[3], unpack(args, 8, last_field))
  end
  if args[5] ~= '' then
    clear_gap({keys[3]}, {args[5], args[6]})
  end
  local current = delivered(keys[2], args[2])
  if not current or not before(args[3], current) then  -- (no group: NOGROUP, as it should)
    redis.call('XGROUP', 'SETID', keys[2], args[2], args[3], 'ENTRIESREAD', args[4])
  end
  xack(keys[2], args[2], args, last_field + 1)
  return 1
end

redis.register_function('invalgw_append', append)
redis.register_function('invalgw_clear_gap', clear_gap)
redis.register_function{function_name='invalgw_ack', callback=ack, flags={'allow-oom'}}
redis.register_function{
  function_name='invalgw_cursor', callback=save_cursor, flags={'allow-oom'}}
"""


async def load_library(client: AsyncRedis) -> None:
    """Load (or replace with this version) the library into ``client``'s Redis."""
    await client.function_load(SOURCE, replace=True)


def function_missing(exc: redis.ResponseError) -> bool:
    """The Redis answered that it has no such function (the library is not loaded there)."""
    return "function not found" in str(exc).lower()


def is_fenced(exc: redis.ResponseError) -> bool:
    """The Redis refused a fenced write: the lease is another gateway's now (or expired)."""
    return str(exc).startswith(FENCED)


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Fence:
    """The lease a gateway's progress writes are conditional on: ``key`` must hold ``holder``."""

    key: str
    holder: str
    renewed_lately: Callable[[], bool] = _always
    """Whether this process renewed the lease within half its TTL, by its own clock. Reads and
    sends wait while it did not (see :func:`check_renewed`): a process that was frozen past its
    lease (SIGSTOP, a VM paused) must not read entries another process now owns before its lease
    loop finds out and stops it, or that owner's sender would skip them."""


class LeaseNotRenewed(redis.RedisError):
    """This process has not renewed its lease for half its TTL: it reads and sends nothing until
    a renewal succeeds or its lease loop stops it. Retried like an unreachable Redis."""


def check_renewed(fence: Fence | None) -> None:
    """Raise :class:`LeaseNotRenewed` unless ``fence``'s lease was renewed lately."""
    if fence is not None and not fence.renewed_lately():
        raise LeaseNotRenewed(f"the lease {fence.key} was not renewed for half its TTL")


async def call_fenced(
    client: AsyncRedis,
    function: str,
    fence: Fence | None,
    keys: Sequence[Any],
    args: Sequence[Any],
    *,
    lane: Lane | None = None,
) -> Any:
    """``FCALL function`` with the fence's lease key and holder first (unchecked without one),
    loading the library first if the Redis lost it (restarted since the start)."""
    command = fenced_command(function, fence, keys, args)
    return await with_library(client, partial(call, client, *command, lane=lane))


async def with_library(client: AsyncRedis, attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()`` (a call of one of the library's functions on ``client``), made again once
    the library is loaded if the Redis lost it (it restarted since the gateway started)."""
    try:
        return await attempt()
    except redis.ResponseError as exc:
        if not function_missing(exc):
            raise
    await load_library(client)
    return await attempt()


def fenced_command(
    function: str, fence: Fence | None, keys: Sequence[Any], args: Sequence[Any]
) -> tuple[Any, ...]:
    """The ``FCALL`` of a fenced function: the lease key and holder first (unchecked without
    a fence: the first key again, and an empty holder)."""
    keys = [fence.key if fence else keys[0], *keys]
    return ("FCALL", function, len(keys), *keys, fence.holder if fence else "", *args)
