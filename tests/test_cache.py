"""The cache's effects on a real standalone Redis and a real 3-primary Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from invalgw.cache import Cache
from invalgw.connections import REDIS_ERRORS, close
from invalgw.dev.localredis import RedisProcess
from invalgw.effects import Plan
from invalgw.fence import fence_key, fill, is_fence_key
from tests.cluster import cluster_port, redis_cluster
from tests.processes import die_with_parent
from tests.servers import RedisServer, no_retry

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def cluster_nodes() -> Iterator[list[RedisProcess]]:
    with redis_cluster(3) as nodes:
        yield nodes


@pytest.fixture(params=["standalone", "cluster"])
async def cache(
    request: pytest.FixtureRequest,
    session_servers: list[RedisServer],
    cluster_nodes: list[RedisProcess],
) -> AsyncIterator[Cache]:
    client: redis.asyncio.Redis | RedisCluster
    if request.param == "standalone":
        client = redis.asyncio.Redis.from_url(
            session_servers[0].url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
        )
    else:
        client = RedisCluster(
            host="127.0.0.1",
            port=cluster_nodes[0].port,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=no_retry(),
        )
    try:
        yield Cache(client, fence_ttl_ms=30_000)
    finally:
        await close(client)


async def populate(cache: Cache, keys: set[str] | list[str]) -> None:
    async with cache.client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.set(key, "v")
        await pipe.execute()


async def test_unlink_removes_keys_across_slots(cache: Cache, namespace: str) -> None:
    keys = [f"{namespace}:k:{i}" for i in range(2500)]  # many slots, more than one UNLINK chunk
    await populate(cache, keys)
    removed = await cache.apply(Plan(unlink=[*keys, f"{namespace}:absent"]))
    assert removed == len(keys)
    found = [key async for batch in cache.scan(f"{namespace}:k:*") for key in batch]
    assert found == []


async def test_soft_expiry_sets_ttls_and_never_extends_a_shorter_one(
    cache: Cache, namespace: str
) -> None:
    persistent, short = f"{namespace}:persistent", f"{namespace}:short"
    await cache.client.set(persistent, "v")
    await cache.client.set(short, "v", px=500)
    await cache.apply(Plan(expire=[(persistent, 5000), (short, 5000)]))
    assert 4000 < await cache.client.pttl(persistent) <= 5000  # a key without TTL gets one
    assert 0 < await cache.client.pttl(short) <= 500  # a shorter TTL is kept


async def test_fenced_invalidation_refuses_stale_fills_and_admits_fresh_ones(
    cache: Cache, namespace: str
) -> None:
    key = f"{{{namespace}:user:7}}:profile"
    await cache.client.set(key, "old")
    removed = await cache.apply(Plan(fenced=[(key, "42", 0)]))
    assert removed == 1
    assert await cache.client.exists(key) == 0
    assert await cache.client.get(fence_key(key)) == b"42"

    assert not await fill(cache.client, key, "read at 41", version=41, ttl_ms=10_000)  # type: ignore[arg-type]
    assert await cache.client.exists(key) == 0
    assert await fill(cache.client, key, "read at 42", version=42, ttl_ms=10_000)  # type: ignore[arg-type]
    assert await cache.client.get(key) == b"read at 42"

    # an older invalidation arriving late never lowers the fence
    await cache.apply(Plan(fenced=[(key, "9", 0)]))
    assert await cache.client.get(fence_key(key)) == b"42"
    # versions compare as numbers of any length, not as text
    assert await fill(cache.client, key, "read at 100", version=100)  # type: ignore[arg-type]


async def test_scan_finds_every_matching_key_and_nothing_else(cache: Cache, namespace: str) -> None:
    wanted = {f"{namespace}:cat:{i}" for i in range(3000)}
    others = {f"{namespace}:dog:{i}" for i in range(300)}
    await populate(cache, wanted | others)
    found: set[str] = set()
    batches = 0
    async for batch in cache.scan(f"{namespace}:cat:*", count=500):
        found.update(key.decode() for key in batch)
        batches += 1
    assert found == wanted
    assert batches > 1  # walked in bounded batches


async def test_scan_of_a_hash_tag_group(cache: Cache, namespace: str) -> None:
    group = {f"{{{namespace}:user:1001}}:{part}" for part in ("profile", "perms", "cart")}
    await populate(cache, group | {f"{{{namespace}:user:1002}}:profile"})
    found: set[str] = set()
    async for batch in cache.scan(f"{{{namespace}:user:1001}}:*"):
        found.update(key.decode() for key in batch)
    assert found == group


@pytest.mark.parametrize(
    "key",
    ["user:7:profile", "{user:7}:profile", "odd}key", "a{}b", "with:invalgw:fence:inside"],
)
def test_tombstones_are_told_apart_from_the_keys_they_fence(key: str) -> None:
    assert is_fence_key(fence_key(key))
    assert not is_fence_key(key)


@pytest.mark.parametrize("group", [False, True], ids=["namespace", "hash-tag-group"])
async def test_a_walk_is_complete_as_the_first_call_of_a_cluster_client(
    cluster_nodes: list[RedisProcess], namespace: str, group: bool
) -> None:
    """After a restart, a pattern walk may be the first thing the gateway asks of its cluster
    cache (a walk redone, a resync): the client does not know the nodes yet."""
    prefix = f"{{{namespace}:user:1}}" if group else f"{namespace}:first"
    keys = {f"{prefix}:{i}" for i in range(300)}
    url = f"redis://127.0.0.1:{cluster_nodes[0].port}/0"
    setup = RedisCluster.from_url(url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry())
    fresh = RedisCluster.from_url(url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry())
    try:
        await populate(Cache(setup), keys)
        found = {key.decode() async for batch in Cache(fresh).scan(f"{prefix}:*") for key in batch}
    finally:
        await close(setup)
        await close(fresh)
    assert found == keys


async def move_slot(nodes: list[RedisProcess], slot: int, *, finish: bool) -> None:
    """Reshard ``slot`` to another primary, as ``redis-cli --cluster reshard`` does: mark it
    migrating, move its keys (half of them unless ``finish``), and with ``finish`` hand it over.
    A client that cached the slot map before still sends the slot's keys to the old node."""
    clients = {
        node.port: redis.asyncio.Redis(
            port=node.port, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
        )
        for node in nodes
    }
    try:
        ids = {
            port: (await client.execute_command("CLUSTER MYID")).decode()  # type: ignore[no-untyped-call]
            for port, client in clients.items()
        }
        any_client = next(iter(clients.values()))
        for start, end, primary, *_ in await any_client.execute_command("CLUSTER SLOTS"):  # type: ignore[no-untyped-call]
            if start <= slot <= end:
                source = int(primary[1])
        target = next(port for port in clients if port != source)
        await clients[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])  # type: ignore[no-untyped-call]
        await clients[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])  # type: ignore[no-untyped-call]
        moving = await clients[source].execute_command("CLUSTER GETKEYSINSLOT", slot, 10_000)  # type: ignore[no-untyped-call]
        moving = moving if finish else moving[: len(moving) // 2]
        await clients[source].execute_command(  # type: ignore[no-untyped-call]
            "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *moving
        )
        if finish:
            for client in clients.values():
                await client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])  # type: ignore[no-untyped-call]
    finally:
        for client in clients.values():
            await close(client)


@pytest.mark.parametrize("finish", [True, False], ids=["slot-moved", "slot-migrating"])
async def test_effects_reach_keys_whose_slot_moved_under_the_client(
    cluster_nodes: list[RedisProcess], namespace: str, finish: bool
) -> None:
    """The one-script apply goes to the node the client thinks serves the keys; when a slot has
    moved (or is half way), that node refuses and the effects are redone slot by slot."""
    url = f"redis://127.0.0.1:{cluster_nodes[0].port}/0"
    client = RedisCluster.from_url(
        url, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
    )
    cache = Cache(client)
    moving = [f"{{{namespace}:moving}}:{i}" for i in range(40)]
    staying = [f"{namespace}:staying:{i}" for i in range(200)]
    try:
        await populate(cache, moving + staying)
        await move_slot(cluster_nodes, key_slot(moving[0].encode()), finish=finish)
        soft = [(key, 30_000) for key in moving[::2] + staying[::2]]
        gone = moving[1::2] + staying[1::2]
        removed = await cache.apply(Plan(unlink=[*gone], expire=[*soft]))
        assert removed <= len(gone)  # keys the refused script removed are not counted twice
        async with client.pipeline(transaction=False) as pipe:
            for key in gone:
                pipe.execute_command("EXISTS", key)
            for key, _ in soft:
                pipe.execute_command("PTTL", key)
            replies = await pipe.execute()
    finally:
        await close(client)
    assert replies[: len(gone)] == [0] * len(gone)
    assert all(0 < ttl <= 30_000 for ttl in replies[len(gone) :])


async def test_a_cluster_missing_a_slot_is_a_redis_error_the_stages_retry(namespace: str) -> None:
    """A cluster that lost a slot (its primary died, no replica took over) cannot be applied to
    for a while: the error must be one the stages back off and retry on, not a crash."""
    node = RedisProcess(
        cluster_port(),
        args=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"),
        preexec=die_with_parent,
    )
    node.args += ("--cluster-config-file", f"nodes-{node.port}.conf")
    node.start()
    admin = redis.asyncio.Redis(
        port=node.port, socket_timeout=5, socket_connect_timeout=2, retry=no_retry()
    )
    client = RedisCluster(
        host="127.0.0.1",
        port=node.port,
        socket_timeout=2,
        socket_connect_timeout=2,
        retry=no_retry(),
    )
    try:
        await admin.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call]
        key = f"{namespace}:lost"
        await admin.execute_command("CLUSTER DELSLOTS", key_slot(key.encode()))  # type: ignore[no-untyped-call]
        with pytest.raises(REDIS_ERRORS):
            await Cache(client).apply(Plan(unlink=[key]))
    finally:
        await close(client)
        await close(admin)
        node.cleanup()


@pytest.mark.parametrize("odd", ["odd}key", "a{}b", "{}x"])
async def test_keys_without_a_usable_hash_tag_can_be_fenced(
    cache: Cache, namespace: str, odd: str
) -> None:
    """A key with a ``}`` but no hash tag cannot be wrapped in a tag: its tombstone still shares
    its slot on a cluster (else every versioned invalidation of it fails, and its stage with it)."""
    key = f"{namespace}:{odd}"
    await cache.client.set(key, "old")
    assert await cache.apply(Plan(fenced=[(key, "5", 0)])) == 1
    assert key_slot(fence_key(key).encode()) == key_slot(key.encode())
    assert is_fence_key(fence_key(key))
    assert not await fill(cache.client, key, "read at 4", version=4)  # type: ignore[arg-type]
    assert await fill(cache.client, key, "read at 5", version=5)  # type: ignore[arg-type]


def test_the_blocking_fill_helper_obeys_the_fence(
    session_servers: list[RedisServer], namespace: str
) -> None:
    """fill_sync, for services without asyncio, refuses and admits like fill."""
    import redis

    from invalgw.fence import fill_sync

    client = redis.Redis.from_url(
        session_servers[0].url,
        socket_timeout=5,
        socket_connect_timeout=2,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
    )
    key = f"{namespace}:sync:profile"
    try:
        client.set(fence_key(key), "42")
        assert not fill_sync(client, key, "read at 41", version=41, ttl_ms=10_000)
        assert client.exists(key) == 0
        assert fill_sync(client, key, "read at 42", version=42, ttl_ms=10_000)
        assert client.get(key) == b"read at 42"
    finally:
        client.close()
