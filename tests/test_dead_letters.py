"""Bad input loses nothing and stops nothing.

An entry that does not parse or breaks a limit goes to ``<namespace>:dead`` with the reason and
its original fields, is acknowledged, and the entries around it are applied everywhere. The same
holds for garbage in a mirror stream. A property test throws arbitrary fields at running gateway
processes: each entry is either applied in every region or dead-lettered, and nothing stalls.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from invalgw.names import APPLY_GROUP, Names
from invalgw.proto import (
    Batch,
    Heartbeat,
    InvalidEntry,
    Limits,
    encode_envelope,
    entry_fields,
    parse_entry,
)
from tests.conftest import (
    REGIONS,
    clients,
    make_configs,
    metric,
    running,
    stream_entries,
    wait_gone,
)
from tests.processes import GatewayProcess, Processes, all_gone, settled, sync_client, wait_for
from tests.servers import RedisServer

LIMITS = Limits()


def urls_of(servers: list[RedisServer]) -> dict[str, str]:
    return {region: server.url for region, server in zip(REGIONS, servers, strict=True)}


BAD_ENTRIES: dict[str, dict[bytes, bytes]] = {
    "unknown_op": {b"op": b"explode", b"keys": b"a b"},
    "missing_field": {b"keys": b"a b"},
    "no_keys": {b"op": b"unlink", b"keys": b"   "},
    "too_many_keys": {b"op": b"unlink", b"keys": b" ".join(b"k%d" % i for i in range(1001))},
    "key_too_long": {b"op": b"unlink", b"keys": b"k" * 1025},
    "bad_version": {b"op": b"unlink", b"keys": b"a", b"v": b"2"},
    "not_utf8": {b"op": b"unlink", b"keys": b"a\xff\xfe"},
    "field_too_long": {b"op": b"unlink", b"keys": b"a", b"source": b"s" * 70_000},
    "empty_key": {b"op": b"unlink", b"keys": b"a,,b", b"sep": b","},
}


@pytest.mark.anyio
async def test_bad_entries_are_dead_lettered_and_the_rest_applied(
    session_servers: list[RedisServer], namespace: str
) -> None:
    configs = make_configs(urls_of(session_servers), namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    keys = [f"{namespace}:ok:{i}" for i in range(len(BAD_ENTRIES) + 1)]
    async with clients(configs) as redis_by_region, running(configs) as gateways:
        east = redis_by_region["us-east"]
        for client in redis_by_region.values():
            await client.mset(dict.fromkeys(keys, "cached"))
        bad_ids: dict[bytes, str] = {}
        await east.xadd(names.local_stream, entry_fields([keys[0]]))  # type: ignore[arg-type]
        for key, (code, fields) in zip(keys[1:], BAD_ENTRIES.items(), strict=True):
            bad_id: Any = await east.xadd(names.local_stream, fields)  # type: ignore[arg-type]
            bad_ids[bad_id] = code
            await east.xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]

        for region, client in redis_by_region.items():
            await wait_gone(client, keys, region=region)
        dead = {
            fields[b"dead.id"]: fields
            for _, fields in await stream_entries(east, names.dead_letters)
        }
        assert set(dead) == set(bad_ids)
        for entry_id, code in bad_ids.items():
            letter = dead[entry_id]
            original = {k: v for k, v in letter.items() if not k.startswith(b"dead.")}
            assert original == BAD_ENTRIES[code], code
            assert letter[b"dead.stream"] == names.local_stream.encode()
            assert letter[b"dead.region"] == b"us-east"
            assert letter[b"dead.reason"], code
            counted = metric(
                gateways["us-east"], "invalgw_dead_letters_total", region="us-east", reason=code
            )
            assert counted == 1, code
        summary = await east.xpending(names.local_stream, APPLY_GROUP)
        assert summary["pending"] == 0
        for region in ("eu-west", "ap-south"):  # dead letters stay in the region they came from
            assert await redis_by_region[region].xlen(names.dead_letters) == 0


@pytest.mark.anyio
async def test_garbage_in_a_mirror_is_dead_lettered(
    session_servers: list[RedisServer], namespace: str
) -> None:
    configs = make_configs(urls_of(session_servers), namespace)
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    mirror = names.mirror("us-east")
    good = Batch(origin="us-east", epoch="e", prev="0-0", events=[], sent_ms=1)
    garbage: dict[str, dict[bytes, bytes]] = {
        "no envelope field": {b"x": b"y"},
        "not msgpack": {b"d": b"\xc1\xc1"},
        "wrong origin": {b"d": encode_envelope(msgspec.structs.replace(good, origin="ap-south"))},
        "bad prev": {b"d": encode_envelope(msgspec.structs.replace(good, prev="yesterday"))},
        "bad heartbeat": {
            b"d": encode_envelope(Heartbeat(origin="us-east", epoch="e", last="?", sent_ms=1))
        },
    }
    key = f"{namespace}:after-garbage"
    async with clients(configs) as redis_by_region, running(configs, "eu-west"):
        west = redis_by_region["eu-west"]
        await west.set(key, "cached")
        for fields in garbage.values():
            await west.xadd(mirror, fields)  # type: ignore[arg-type]
        async with running(configs, "us-east"):
            await redis_by_region["us-east"].xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]
            await wait_gone(west, [key], region="eu-west")
        letters = await stream_entries(west, names.dead_letters)
        assert len(letters) == len(garbage)
        assert {fields[b"dead.stream"] for _, fields in letters} == {mirror.encode()}


# --- property test: arbitrary fields against running gateway processes -------------------------

FIELD_NAMES = st.one_of(
    st.sampled_from([b"op", b"keys", b"v", b"sep", b"traceparent", b"source", b""]),
    st.binary(max_size=16),
)
KEY_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
FIELD_VALUES = st.one_of(
    st.sampled_from([b"unlink", b"1", b"2", b"", b" ", b"\x1f"]),
    st.binary(max_size=48),
    st.text(max_size=48).map(str.encode),
    st.lists(KEY_TEXT, min_size=1, max_size=6).map(lambda keys: " ".join(keys).encode()),
    st.integers(min_value=LIMITS.max_field_bytes - 2, max_value=LIMITS.max_field_bytes + 2).map(
        lambda n: b"k" * n
    ),
)
ARBITRARY = st.dictionaries(FIELD_NAMES, FIELD_VALUES, min_size=1, max_size=6)


@st.composite
def mostly_valid(draw: st.DrawFn) -> dict[bytes, bytes]:
    """Entries close to the contract, sometimes off in one field, with extra fields mixed in."""
    sep = draw(st.sampled_from([None, ",", "\x1f", " "]))
    keys = draw(st.lists(KEY_TEXT, min_size=1, max_size=6))
    fields = draw(st.dictionaries(FIELD_NAMES, FIELD_VALUES, max_size=2))
    fields[b"op"] = draw(st.sampled_from([b"unlink"] * 5 + [b"Unlink"]))
    fields[b"keys"] = (sep or " ").join(keys).encode()
    if sep is not None:
        fields[b"sep"] = sep.encode()
    version = draw(st.sampled_from([None, b"1", b"1", b"2"]))
    if version is not None:
        fields[b"v"] = version
    return fields


ENTRIES = st.lists(st.one_of(ARBITRARY, mostly_valid()), min_size=1, max_size=8)


class Fuzzed:
    """Three gateway processes shared by every example of the property test."""

    def __init__(self, configs: dict[str, Any], names: Names) -> None:
        self.names = names
        self.redis = {region: sync_client(config) for region, config in configs.items()}
        self.gateways: dict[str, GatewayProcess] = {}


@pytest.fixture(scope="module")
def fuzzed(
    session_servers: list[RedisServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzed]:
    namespace = f"fz{uuid.uuid4().hex[:8]}"
    configs = make_configs(urls_of(session_servers), namespace)
    processes = Processes(Path(tmp_path_factory.mktemp("fuzz")))
    target = Fuzzed(
        configs, Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    )
    try:
        target.gateways = processes.start_all(configs)
        yield target
    finally:
        processes.close()
        for client in target.redis.values():
            client.close()


def expected_keys(fields: dict[bytes, bytes]) -> list[str] | None:
    """The keys a valid entry invalidates; None when the gateway must dead-letter it."""
    try:
        return parse_entry("0-1", fields, LIMITS).keys
    except InvalidEntry:
        return None


@pytest.mark.e2e
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(entries=ENTRIES)
def test_any_entry_is_applied_or_dead_lettered(
    fuzzed: Fuzzed, entries: list[dict[bytes, bytes]]
) -> None:
    names, east = fuzzed.names, fuzzed.redis["us-east"]
    sentinel = f"{names.namespace}-key:sentinel:{uuid.uuid4().hex}"
    keys_of = [expected_keys(fields) for fields in entries]
    cached = [key for keys in keys_of if keys for key in keys] + [sentinel]
    for client in fuzzed.redis.values():
        client.mset(dict.fromkeys(cached, b"cached"))
    with east.pipeline(transaction=False) as pipe:
        for fields in entries:
            pipe.xadd(names.local_stream, fields)  # type: ignore[arg-type]
        pipe.xadd(names.local_stream, entry_fields([sentinel]))  # type: ignore[arg-type]
        *ids, _ = pipe.execute()

    for region, client in fuzzed.redis.items():
        wait_for(partial(all_gone, client, [sentinel]), what=f"the sentinel gone in {region}")
    wait_for(lambda: settled(east, names.local_stream), what="us-east's groups to settle")
    letters: Any = east.xrange(names.dead_letters, min=ids[0])
    dead = {fields[b"dead.id"] for _, fields in letters}
    event(f"{sum(keys is None for keys in keys_of)} of {len(entries)} dead-lettered")
    for entry_id, fields, keys in zip(ids, entries, keys_of, strict=True):
        if keys is None:
            assert entry_id in dead, fields
        else:
            assert entry_id not in dead, fields
            for region, client in fuzzed.redis.items():
                assert all_gone(client, keys), (region, fields)
    for process in fuzzed.gateways.values():
        assert process.running, process.log()[-3000:]
