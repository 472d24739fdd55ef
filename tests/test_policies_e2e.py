"""Invalidation policies end to end: three regions' gateways running, real Redis servers.

Soft invalidations land inside each region's staggered slot of the window, evenly spread, never
lengthening a shorter TTL; hybrid unlinks only in the writer's region; a rule can refuse a softer
mode; versioned invalidations fence out stale fills across regions; a gap resyncs the configured
patterns. Timing tolerances are derived from Redis server time (``TIME``) read around each step,
so they are measured, not guessed: see :class:`Expiries`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import redis.asyncio

from invalgw.config import RegionConfig
from invalgw.fence import fence_key, fill
from invalgw.names import Names
from invalgw.policy import Policy, Rule
from invalgw.proto import entry_fields
from invalgw.service import Gateway
from tests.conftest import (
    REGIONS,
    clients,
    make_configs,
    metric,
    running,
    wait_gone,
    wait_until,
)
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio

SOFT_KEYS = 10_000
SHORT_PX = 20_000
"""A TTL shorter than every slot used here: a soft invalidation must leave it alone."""
LONG_PX = 600_000
"""A TTL longer than every slot: a soft invalidation must shorten it."""


def urls_of(servers: list[RedisServer]) -> dict[str, str]:
    return {region: server.url for region, server in zip(REGIONS, servers, strict=True)}


def with_policy(config: RegionConfig, **fields: Any) -> RegionConfig:
    return msgspec.structs.replace(config, policy=Policy(**fields))


async def server_ms(client: redis.asyncio.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def applied(gateway: Gateway, origin: str, op: str) -> float:
    region = gateway.config.region
    return metric(
        gateway, "invalgw_invalidations_applied_total", region=region, origin=origin, op=op
    )


async def wait_applied(
    gateways: dict[str, Gateway], origin: str, op: str, entries: int, *, seconds: float = 10
) -> None:
    async def done() -> bool:
        return all(applied(gw, origin, op) >= entries for gw in gateways.values())

    await wait_until(done, seconds=seconds, what=f"{entries} {op} entries applied everywhere")


async def xadd_chunks(
    client: redis.asyncio.Redis, stream: str, keys: Sequence[str], *, op: str, **kw: Any
) -> int:
    """Invalidate ``keys`` with entries of at most 1000 keys (the default limit); one round trip."""
    async with client.pipeline(transaction=False) as pipe:
        for start in range(0, len(keys), 1000):
            pipe.xadd(stream, entry_fields(keys[start : start + 1000], op=op, **kw))  # type: ignore[arg-type]
        await pipe.execute()
    return (len(keys) + 999) // 1000


async def preload(
    client: redis.asyncio.Redis,
    plain: Sequence[str],
    short: Sequence[str] = (),
    long: Sequence[str] = (),
) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for start in range(0, len(plain), 5000):
            pipe.mset(dict.fromkeys(plain[start : start + 5000], "cached"))
        for key in short:
            pipe.set(key, "cached", px=SHORT_PX)
        for key in long:
            pipe.set(key, "cached", px=LONG_PX)
        await pipe.execute()


@dataclass
class Expiries:
    """TTLs of some keys in one region, read after a soft invalidation, with server times.

    ``started_ms`` is the region's Redis clock just before the invalidation was written and
    ``applied_ms`` once the region had applied it, so each key was soft-expired at a server time
    in ``[started_ms, applied_ms]``: its absolute expiry (``PEXPIRETIME``) is that time plus the
    drawn TTL, which is known up to ``apply_slack_ms``. ``read_to_ms`` ends the read of the TTLs:
    a key's PTTL is its drawn TTL minus at most ``read_slack_ms = read_to_ms - started_ms``.
    """

    pttl: list[int]
    expire_at: list[int]
    started_ms: int
    applied_ms: int
    read_to_ms: int

    @property
    def apply_slack_ms(self) -> int:
        return self.applied_ms - self.started_ms

    @property
    def read_slack_ms(self) -> int:
        return self.read_to_ms - self.started_ms


READ_EXPIRIES = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('PTTL', key)
  out[#KEYS + i] = redis.call('PEXPIRETIME', key)
end
local now = redis.call('TIME')
out[2 * #KEYS + 1] = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return out
"""
"""PTTL and PEXPIRETIME of every key, then the server time: one command, read in a few ms on
the server (a pipeline of 20,000 commands would take the client most of a second)."""


async def read_expiries(
    client: redis.asyncio.Redis, keys: Sequence[str], started_ms: int, applied_ms: int
) -> Expiries:
    *values, read_to_ms = await client.eval(READ_EXPIRIES, len(keys), *keys)
    return Expiries(
        pttl=[int(v) for v in values[: len(keys)]],
        expire_at=[int(v) for v in values[len(keys) :]],
        started_ms=started_ms,
        applied_ms=applied_ms,
        read_to_ms=int(read_to_ms),
    )


async def server_times(clients: dict[str, redis.asyncio.Redis]) -> dict[str, int]:
    return {region: await server_ms(client) for region, client in clients.items()}


async def ttls(client: redis.asyncio.Redis, keys: Sequence[str]) -> set[int]:
    """The distinct PTTLs of ``keys`` ({-1}: all there, none with a TTL)."""
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.pttl(key)
        return {int(ttl) for ttl in await pipe.execute()}


def bin_shares(values: Sequence[float], lo: float, hi: float, bins: int = 10) -> list[float]:
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, max(0, int((value - lo) / (hi - lo) * bins)))] += 1
    return [count / len(values) for count in counts]


def ks_distance(values: Sequence[float], lo: float, hi: float) -> float:
    """Kolmogorov-Smirnov distance between ``values`` and the uniform distribution on [lo, hi]."""
    ordered = sorted(values)
    n = len(ordered)
    return max(
        max((i + 1) / n - (v - lo) / (hi - lo), (v - lo) / (hi - lo) - i / n)
        for i, v in enumerate(ordered)
    )


def softened_of(keys: Sequence[str]) -> list[str]:
    """The keys that had no TTL or a longer one (all but every tenth, which had a short TTL)."""
    return [key for key in keys if int(key.rsplit(":", 1)[1]) % 10 != 0]


@pytest.mark.parametrize("layout", ["sorted-names", "explicit-slots"])
async def test_soft_invalidation_lands_in_each_regions_slot(
    session_servers: list[RedisServer], namespace: str, layout: str
) -> None:
    """10,000 keys soft-invalidated in us-east: in every region each key's TTL is inside that
    region's slot, the slots are disjoint and in the configured order, the TTLs are spread
    evenly over the slot, shorter TTLs are kept, and keys without a TTL get one."""
    prefix = f"{namespace}:soft"
    base = make_configs(urls_of(session_servers), namespace)
    if layout == "sorted-names":
        # the op asks for expire; the default window [30 s, 120 s] is cut by sorted region name
        op = "expire"
        configs = {r: with_policy(c, expire_window_ms=(30_000, 120_000)) for r, c in base.items()}
        slots = {
            "ap-south": (30_000, 60_000),
            "eu-west": (60_000, 90_000),
            "us-east": (90_000, 120_000),
        }
    else:
        # the policy decides (op invalidate): a rule makes these keys soft, and each region has
        # an explicit slot of four, in an order that is not the names' order (slot 2 unused)
        op = "invalidate"
        rule = Rule(pattern=f"{prefix}:*", mode="expire", window_ms=(40_000, 120_000))
        explicit = {"us-east": 0, "ap-south": 1, "eu-west": 3}
        configs = {
            r: with_policy(c, stagger_slot=explicit[r], stagger_slots=4, rules=[rule])
            for r, c in base.items()
        }
        slots = {
            "us-east": (40_000, 60_000),
            "ap-south": (60_000, 80_000),
            "eu-west": (100_000, 120_000),
        }
    keys = [f"{prefix}:{i}" for i in range(SOFT_KEYS)]
    short, long = keys[0::10], keys[1::10]
    softened = softened_of(keys)
    plain = [key for i, key in enumerate(keys) if i % 10 > 1]

    async with clients(configs) as redis_by_region, running(configs) as gateways:
        for client in redis_by_region.values():
            await preload(client, plain, short, long)
        started = await server_times(redis_by_region)
        stream = configs["us-east"].streams.local
        entries = await xadd_chunks(redis_by_region["us-east"], stream, keys, op=op)
        await wait_applied(gateways, "us-east", op, entries)
        applied_at = await server_times(redis_by_region)
        seen = {
            r: await read_expiries(c, keys, started[r], applied_at[r])
            for r, c in redis_by_region.items()
        }

    report = []
    ranges: dict[str, tuple[int, int]] = {}
    for region, (lo, hi) in slots.items():
        observed = seen[region]
        pttl = dict(zip(keys, observed.pttl, strict=True))
        expire_at = dict(zip(keys, observed.expire_at, strict=True))
        # keys without a TTL got one, and no key lost its value
        assert all(pttl[key] > 0 for key in keys), f"{region}: a key has no TTL or is gone"
        # a shorter TTL is never lengthened
        assert all(pttl[key] <= SHORT_PX for key in short), f"{region}: a short TTL was extended"
        # every softened key's PTTL is in the region's slot, less at most the time between the
        # invalidation's write and the end of the read (tolerance: read_slack_ms, measured)
        slack = observed.read_slack_ms
        assert slack < (hi - lo) / 4, f"{region}: {slack} ms to apply and read, too loose a check"
        outside = [k for k in softened if not lo - slack <= pttl[k] <= hi]
        assert not outside, f"{region}: {len(outside)} TTLs outside [{lo - slack}, {hi}] ms"
        # the absolute expiry is the apply time (between the write and the moment the region had
        # applied everything: tolerance apply_slack_ms, measured) plus a draw in the slot
        at = [expire_at[key] for key in softened]
        assert observed.started_ms + lo <= min(at)
        assert max(at) <= observed.applied_ms + hi
        ranges[region] = (min(at) - observed.started_ms, max(at) - observed.started_ms)
        # spread: the keys of one entry are applied together (one batch, one script call),
        # so each key's draw is its expiry minus its entry's apply time, estimated from the
        # entry's largest draw (of 900: below the slot's top by width/900 on average, by more
        # than 2% of the width with probability 0.98^900, about 1e-8)
        draws = []
        for start in range(0, SOFT_KEYS, 1000):
            entry_at = [expire_at[key] for key in softened_of(keys[start : start + 1000])]
            applied_ms = max(entry_at) - (hi - 1)
            margin = (hi - lo) * 0.02
            assert observed.started_ms - margin <= applied_ms <= observed.applied_ms
            draws += [t - applied_ms for t in entry_at]
        assert min(draws) >= lo - observed.apply_slack_ms
        assert max(draws) - min(draws) >= 0.99 * (hi - lo), f"{region}: the slot is not covered"
        shares = bin_shares(draws, lo, hi)
        ks = ks_distance(draws, lo, hi)
        # 10 equal bins, each within 2 percentage points of 10% (one bin's standard deviation
        # is 0.3 points for 9,000 draws); and the KS distance within 0.03 (the 0.1% critical
        # value for n = 9,000 is 0.021, plus room for the burst's own duration)
        assert all(abs(share - 0.1) <= 0.02 for share in shares), f"{region}: bins {shares}"
        assert ks <= 0.03, f"{region}: KS distance {ks:.4f} from uniform"
        report.append(
            f"{layout} {region}: slot [{lo}, {hi}] ms, apply slack {observed.apply_slack_ms} ms, "
            f"read slack {slack} ms, draws span {max(draws) - min(draws)} ms, bins "
            + " ".join(f"{share:.3f}" for share in shares)
            + f", KS {ks:.4f}"
        )
    # the regions' slots are disjoint and in the configured order: each region's expiries lie
    # below the next region's, up to the measured apply slack (regions apply at different times)
    ordered = sorted(slots, key=lambda region: slots[region][0])
    for lower, upper in itertools.pairwise(ordered):
        overlap = ranges[lower][1] - ranges[upper][0]
        assert overlap <= seen[lower].apply_slack_ms, f"{lower}, {upper} overlap by {overlap} ms"
        report.append(f"{layout} {lower} below {upper}: overlap {overlap} ms")
    print("\n".join(report))


async def test_hybrid_unlinks_in_the_writers_region_and_expires_elsewhere(
    session_servers: list[RedisServer], namespace: str
) -> None:
    configs = make_configs(
        urls_of(session_servers), namespace, policy={"expire_window_ms": [30_000, 60_000]}
    )
    slots = {"ap-south": (30_000, 40_000), "eu-west": (40_000, 50_000)}
    keys = [f"{namespace}:hybrid:{i}" for i in range(200)]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        for client in redis_by_region.values():
            await preload(client, keys)
        started = await server_times(redis_by_region)
        stream = configs["us-east"].streams.local
        entries = await xadd_chunks(redis_by_region["us-east"], stream, keys, op="hybrid")
        await wait_applied(gateways, "us-east", "hybrid", entries)
        applied_at = await server_times(redis_by_region)
        assert await redis_by_region["us-east"].exists(*keys) == 0
        for region, (lo, hi) in slots.items():
            client = redis_by_region[region]
            observed = await read_expiries(client, keys, started[region], applied_at[region])
            slack = observed.read_slack_ms
            assert all(lo - slack <= ttl <= hi for ttl in observed.pttl), region


async def test_a_rule_without_allow_softer_turns_an_expire_into_an_unlink(
    session_servers: list[RedisServer], namespace: str
) -> None:
    strict, lenient = f"{namespace}:session", f"{namespace}:profile"
    rules = [
        {"pattern": f"{strict}:*", "mode": "unlink", "allow_softer": False},
        {"pattern": f"{lenient}:*", "mode": "unlink"},  # allow_softer defaults to true
    ]
    configs = make_configs(urls_of(session_servers), namespace, policy={"rules": rules})
    strict_keys = [f"{strict}:{i}" for i in range(50)]
    lenient_keys = [f"{lenient}:{i}" for i in range(50)]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        for client in redis_by_region.values():
            await preload(client, strict_keys + lenient_keys)
        stream = configs["us-east"].streams.local
        entries = await xadd_chunks(
            redis_by_region["us-east"], stream, strict_keys + lenient_keys, op="expire"
        )
        await wait_applied(gateways, "us-east", "expire", entries)
        for region, client in redis_by_region.items():
            assert await client.exists(*strict_keys) == 0, region
            async with client.pipeline(transaction=False) as pipe:
                for key in lenient_keys:
                    pipe.pttl(key)
                ttls = await pipe.execute()
            assert all(ttl > 0 for ttl in ttls), region  # the event's softer mode was honoured


class Replica:
    """A database replica that lags: it serves the row as it was before the last write."""

    def __init__(self, version: int, value: str) -> None:
        self.version, self.value = version, value

    def read(self) -> tuple[int, str]:
        return self.version, self.value


async def test_versioned_invalidation_fences_out_stale_fills_in_a_far_region(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """The race: eu-west's service read the row from a lagging replica (version 41) just before
    the change (version 42) was invalidated in us-east, and writes it back just after the
    invalidation arrived in eu-west. The fence refuses it; a fill at version 42 is admitted.
    Without a version, the same write-back leaves the stale value cached."""
    configs = make_configs(urls_of(session_servers), namespace)
    fenced, unfenced = f"{namespace}:user:7:profile", f"{namespace}:user:8:profile"
    async with clients(configs) as redis_by_region, running(configs):
        east, west = redis_by_region["us-east"], redis_by_region["eu-west"]
        for client in redis_by_region.values():
            await client.mset({fenced: "v41", unfenced: "v41"})
        lagging = Replica(41, "v41")  # the primary is at 42 already
        version, stale = lagging.read()

        stream = configs["us-east"].streams.local
        await east.xadd(stream, entry_fields([fenced], version=42))  # type: ignore[arg-type]
        await east.xadd(stream, entry_fields([unfenced]))  # type: ignore[arg-type]
        for region, client in redis_by_region.items():
            await wait_gone(client, [fenced, unfenced], region=region)
            assert await client.get(fence_key(fenced)) == b"42", region

        # just after the invalidation arrived, the service writes back what it read
        assert not await fill(west, fenced, stale, version=version, ttl_ms=60_000)
        assert await west.exists(fenced) == 0
        await west.set(unfenced, stale, px=60_000)  # a fill without a version: stale, cached
        assert await west.get(unfenced) == b"v41"

        # a value read at the invalidation's version (or later) is admitted
        assert await fill(west, fenced, "v42", version=42, ttl_ms=60_000)
        assert await west.get(fenced) == b"v42"
        assert 0 < await west.pttl(fenced) <= 60_000


async def test_a_pattern_invalidation_keeps_the_fences_of_its_keys(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """A versioned invalidation fences a key of a hash-tag group; a later pattern invalidation
    of the whole group must not delete that fence (it sits in the group's hash tag, so the
    pattern matches it), or a stale fill would be admitted again."""
    configs = make_configs(urls_of(session_servers), namespace)
    group = f"{{{namespace}:user:1001}}"
    keys = [f"{group}:profile", f"{group}:perms"]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        east = redis_by_region["us-east"]
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "v6"))
        stream = configs["us-east"].streams.local
        await east.xadd(stream, entry_fields([keys[0]], version=7))  # type: ignore[arg-type]
        for region, client in redis_by_region.items():
            await wait_gone(client, keys[:1], region=region)
            await client.set(keys[0], "v7")
        await east.xadd(stream, entry_fields(pattern=f"{group}:*"))  # type: ignore[arg-type]

        async def walked() -> bool:
            return all(
                metric(
                    gw,
                    "invalgw_pattern_invalidations_total",
                    region=region,
                    origin="us-east",
                )
                == 1
                for region, gw in gateways.items()
            )

        await wait_until(walked, what="the pattern walk in every region")
        for region, client in redis_by_region.items():
            assert await client.exists(*keys) == 0, region
            assert await client.get(fence_key(keys[0])) == b"7", region
            assert not await fill(client, keys[0], "v6", version=6), region


async def test_a_gap_resyncs_the_configured_patterns_in_the_peers(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """us-east's stream is deleted under the running gateways: its history is lost (new epoch),
    eu-west and ap-south record a gap and soft-expire every ``catalog:*`` key inside their slot
    of the default window; other keys, and us-east itself, are untouched."""
    catalog = f"{namespace}:catalog"
    configs = make_configs(
        urls_of(session_servers),
        namespace,
        policy={"expire_window_ms": [30_000, 120_000], "resync_patterns": [f"{catalog}:*"]},
    )
    slots = {"ap-south": (30_000, 60_000), "eu-west": (60_000, 90_000)}
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    catalog_keys = [f"{catalog}:sku:{i}" for i in range(3000)]
    other_keys = [f"{namespace}:cart:{i}" for i in range(300)]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        for client in redis_by_region.values():
            await preload(client, catalog_keys + other_keys)
        # one invalidation through every link, so each peer knows us-east's current epoch
        marker = f"{namespace}:marker"
        for client in redis_by_region.values():
            await client.set(marker, "cached")
        await redis_by_region["us-east"].xadd(names.local_stream, entry_fields([marker]))  # type: ignore[arg-type]
        for region, client in redis_by_region.items():
            await wait_gone(client, [marker], region=region)
        started = await server_times(redis_by_region)

        await redis_by_region["us-east"].delete(names.local_stream)

        async def resynced() -> bool:
            return all(
                metric(
                    gateways[region],
                    "invalgw_pattern_invalidations_total",
                    region=region,
                    origin="us-east",
                )
                >= 1
                for region in slots
            )

        await wait_until(resynced, what="the resync walk in eu-west and ap-south")
        applied_at = await server_times(redis_by_region)
        for region, (lo, hi) in slots.items():
            client = redis_by_region[region]
            observed = await read_expiries(
                client, catalog_keys, started[region], applied_at[region]
            )
            slack = observed.read_slack_ms
            outside = [ttl for ttl in observed.pttl if not lo - slack <= ttl <= hi]
            assert not outside, f"{region}: {len(outside)} TTLs outside [{lo - slack}, {hi}]"
            assert await ttls(client, other_keys) == {-1}, region
        assert await ttls(redis_by_region["us-east"], catalog_keys) == {
            -1
        }  # no gap where the history was lost: nothing to resync
