"""Hostile input: keys that are not UTF-8, entries aimed at the gateway's own state, duplicate
fields, and envelopes forged straight into a mirror stream (the most a peer's credential allows).

Gateways run as processes against real Redis; each test checks the outcome a user cares about:
the keys that should go are gone in every region, the gateway's state is intact, the gateway is
still up, and what was refused is in the dead letters with the reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invalgw.config import RegionConfig
from invalgw.names import APPLY_GROUP, Names
from invalgw.proto import (
    Batch,
    Guard,
    Invalidation,
    InvalidEntry,
    Limits,
    StreamFields,
    check_invalidation,
    encode_envelope,
    entry_fields,
    parse_entry,
)
from invalgw.proto.envelope import ENVELOPE_FIELD
from tests.conftest import REGIONS, make_configs
from tests.processes import GatewayProcess, Processes, settled, sync_client, wait_for
from tests.servers import RedisServer

GUARD = Guard(namespace="invalgw", names=("invalidations",))


def urls_of(servers: list[RedisServer]) -> dict[str, str]:
    return {region: server.url for region, server in zip(REGIONS, servers, strict=True)}


# --- the guard, without Redis ---------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "*",
        "inv*",
        "invalgw:*",
        "[i]nvalgw:*",
        "invalgw?dead",
        "i\\nvalgw:*",
        "invalid*",
        "in[^x]alidations",
        "invalidation?",
        "invalgw",
        "[a-z]*",
        "??????????*",
    ],
)
def test_a_pattern_that_could_match_a_gateway_key_is_refused(pattern: str) -> None:
    limits = Guard(namespace="invalgw", names=("invalidations",), min_pattern_prefix=0)
    with pytest.raises(InvalidEntry) as refused:
        parse_entry("1-0", {b"op": b"unlink", b"pattern": pattern.encode()}, limits)
    assert refused.value.code == "reserved_pattern"


@pytest.mark.parametrize(
    "pattern", ["{user:1001}:*", "user:*", "invalgx:*", "invalidations:*", "inv[^a]*", "x*"]
)
def test_a_pattern_that_cannot_match_a_gateway_key_is_accepted(pattern: str) -> None:
    limits = Guard(namespace="invalgw", names=("invalidations",), min_pattern_prefix=0)
    event = parse_entry("1-0", {b"op": b"unlink", b"pattern": pattern.encode()}, limits)
    assert event.pattern == pattern


@pytest.mark.parametrize("key", ["invalgw:dead", "invalgw:epoch", "invalidations", "invalgw"])
def test_a_gateway_key_is_refused_among_others(key: str) -> None:
    with pytest.raises(InvalidEntry) as refused:
        parse_entry("1-0", {b"op": b"unlink", b"keys": f"user:1 {key}".encode()}, GUARD)
    assert refused.value.code == "reserved_key"


def test_duplicate_fields_are_refused_not_resolved() -> None:
    fields = StreamFields([b"op", b"purge", b"op", b"unlink", b"keys", b"a"])
    assert fields.pairs == [b"op", b"purge", b"op", b"unlink", b"keys", b"a"]
    with pytest.raises(InvalidEntry) as refused:
        parse_entry("1-0", fields, GUARD)
    assert refused.value.code == "duplicate_field"


@pytest.mark.parametrize(
    ("event", "code"),
    [
        (Invalidation("1-0", "unlink", [], pattern="*"), "pattern_too_broad"),
        (Invalidation("1-0", "unlink", [], pattern="[i]nvalgw:*"), "pattern_too_broad"),
        (Invalidation("1-0", "unlink", [], pattern="invalgw:*"), "reserved_pattern"),
        (Invalidation("1-0", "unlink", ["invalgw:dead"]), "reserved_key"),
        (Invalidation("1-0", "unlink", ["invalidations"]), "reserved_key"),
        (Invalidation("1-0", "unlink", [f"k{i}" for i in range(1001)]), "too_many_keys"),
        (Invalidation("1-0", "unlink", ["k" * 1025]), "key_too_long"),
        (Invalidation("1-0", "unlink", ["a", ""]), "empty_key"),
        (Invalidation("1-0", "unlink", []), "no_keys"),
        (Invalidation("1-0", "unlink", ["a"], pattern="abc*"), "keys_and_pattern"),
        (Invalidation("1-0", "unlink", ["a"], version="01"), "bad_fence_version"),
        (Invalidation("1-0", "unlink", ["a"], source="s" * 70_000), "field_too_long"),
    ],
)
def test_an_envelope_event_is_held_to_the_receivers_limits(event: Invalidation, code: str) -> None:
    with pytest.raises(InvalidEntry) as refused:
        check_invalidation(event, GUARD)
    assert refused.value.code == code


def test_an_envelope_event_a_producer_could_write_passes() -> None:
    check_invalidation(Invalidation("1-0", "expire", ["user:1", "user:2"], version="7"), GUARD)
    check_invalidation(Invalidation("1-0", "unlink", [], pattern="{user:1}:*"), GUARD)
    check_invalidation(Invalidation("1-0", "unlink", ["invalgw:x"]), Limits())  # no names known


# --- gateways as processes --------------------------------------------------------------------


class Mesh:
    """Three gateway processes and a blocking client per region's Redis."""

    def __init__(self, configs: dict[str, RegionConfig], processes: Processes) -> None:
        self.configs = configs
        east = next(iter(configs.values()))
        self.names = Names(east.streams.namespace, east.streams.local)
        self.redis = {region: sync_client(config) for region, config in configs.items()}
        self.gateways: dict[str, GatewayProcess] = processes.start_all(configs)

    def close(self) -> None:
        for client in self.redis.values():
            client.close()

    def dead_letters(self, region: str) -> list[dict[bytes, bytes]]:
        entries: Any = self.redis[region].xrange(self.names.dead_letters)
        return [fields for _, fields in entries]

    def state(self, region: str) -> dict[str, Any]:
        """What a destroyed gateway state would lose: its keys and the stream's groups."""
        client, names = self.redis[region], self.names
        groups = sorted(info["name"] for info in client.xinfo_groups(names.local_stream))
        return {
            "epoch": client.get(names.epoch),
            "status": sorted(client.hkeys(names.status)),
            "groups": groups,
            "mirrors": sorted(client.scan_iter(match=f"{names.namespace}:mirror:*")),
        }

    def all_running(self) -> bool:
        return all(process.running for process in self.gateways.values())


@pytest.fixture
def mesh(session_servers: list[RedisServer], tmp_path: Path, namespace: str) -> Iterator[Mesh]:
    processes = Processes(tmp_path)
    try:
        made = Mesh(make_configs(urls_of(session_servers), namespace), processes)
        try:
            yield made
        finally:
            made.close()
    finally:
        processes.close()


def gone_everywhere(mesh: Mesh, keys: list[Any]) -> None:
    for region, client in mesh.redis.items():
        wait_for(partial(_none_exist, client, keys), what=f"{keys!r} gone in {region}")


def _none_exist(client: redis.Redis, keys: list[Any]) -> bool:
    return int(client.exists(*keys)) == 0


@pytest.mark.e2e
def test_a_walk_that_meets_a_key_that_is_not_utf8_invalidates_it(
    mesh: Mesh, namespace: str
) -> None:
    """``SET $'bin:{g}:\\xff' 1`` then a pattern over it: gone in every region, gateways up."""
    prefix = f"{namespace}:bin:{{g}}:".encode()
    keys = [prefix + b"\xff", prefix + b"\xc3\x28", prefix + b"plain"]
    kept = f"{namespace}:other:\xff".encode()
    for client in mesh.redis.values():
        client.mset(dict.fromkeys([*keys, kept], b"1"))
    east = mesh.redis["us-east"]
    east.xadd(mesh.names.local_stream, entry_fields(pattern=f"{namespace}:bin:{{g}}:*"))  # type: ignore[arg-type]
    gone_everywhere(mesh, keys)
    wait_for(lambda: settled(east, mesh.names.local_stream), what="us-east's groups to settle")
    assert all(int(client.exists(kept)) == 1 for client in mesh.redis.values())
    assert mesh.all_running()
    assert mesh.dead_letters("us-east") == []


@pytest.mark.e2e
def test_entries_aimed_at_the_gateway_are_refused_and_its_state_survives(
    mesh: Mesh, namespace: str
) -> None:
    """The entries that once wiped dead letters, epoch, links and the stream everywhere."""
    names, east = mesh.names, mesh.redis["us-east"]
    warm_up(mesh, namespace)
    east.xadd(names.local_stream, {"op": "explode", "keys": "x"})  # a dead letter to keep
    hostile: list[dict[str, str]] = [
        {"op": "unlink", "keys": names.dead_letters},
        {"op": "unlink", "pattern": f"{names.namespace}:*"},
        {"op": "unlink", "pattern": f"[{names.namespace[0]}]{names.namespace[1:]}:*"},
        {"op": "unlink", "pattern": f"{names.namespace[:4]}*"},
        {"op": "unlink", "keys": names.local_stream},
        {"op": "unlink", "keys": f"{names.namespace}:epoch {names.namespace}:status"},
        {"op": "expire", "keys": names.mirror("eu-west")},
    ]
    before = {region: mesh.state(region) for region in REGIONS}
    ids: list[Any] = [east.xadd(names.local_stream, fields) for fields in hostile]  # type: ignore[arg-type]
    canary = f"{namespace}:canary"
    for client in mesh.redis.values():
        client.set(canary, b"1")
    east.xadd(names.local_stream, entry_fields([canary]))  # type: ignore[arg-type]
    gone_everywhere(mesh, [canary])

    letters = {fields[b"dead.id"]: fields for fields in mesh.dead_letters("us-east")}
    for entry_id in ids:
        assert letters[entry_id][b"dead.reason"].startswith((b"key ", b"pattern ")), entry_id
    assert len(mesh.dead_letters("us-east")) == len(hostile) + 1  # the first one survived too
    for region in REGIONS:
        assert mesh.state(region) == before[region], region
    for receiver in ("eu-west", "ap-south"):  # refused in the origin: never forwarded
        assert mesh.dead_letters(receiver) == []
    assert mesh.all_running()


@pytest.mark.e2e
def test_a_consumer_group_named_in_binary_does_not_stop_the_gateway(
    mesh: Mesh, namespace: str
) -> None:
    """Another application's group on the stream, its name not UTF-8: named in the log."""
    east = mesh.redis["us-east"]
    east.xgroup_create(mesh.names.local_stream, b"other-\xff", id="$")
    mesh.gateways["us-east"].wait_for_log("other-\\xff")
    warm_up(mesh, namespace)
    assert mesh.all_running()


def forge(mesh: Mesh, region: str, origin: str, events: list[Invalidation]) -> bytes:
    """An envelope written straight into ``region``'s mirror of ``origin`` (a peer's XADD), in
    the origin's real epoch so that only its events can be judged."""
    epoch: Any = mesh.redis[origin].get(mesh.names.epoch)
    batch = Batch(origin=origin, epoch=epoch.decode(), prev="0-0", events=events, sent_ms=0)
    entry_id: Any = mesh.redis[region].xadd(
        mesh.names.mirror(origin), {ENVELOPE_FIELD: encode_envelope(batch)}
    )
    return bytes(entry_id)


def warm_up(mesh: Mesh, namespace: str) -> None:
    """One invalidation from each region applied everywhere: links, mirrors and status exist."""
    keys = [f"{namespace}:warm:{region}" for region in mesh.redis]
    for client in mesh.redis.values():
        client.mset(dict.fromkeys(keys, b"1"))
    for key, client in zip(keys, mesh.redis.values(), strict=True):
        client.xadd(mesh.names.local_stream, entry_fields([key]))  # type: ignore[arg-type]
    gone_everywhere(mesh, keys)
    for region, client in mesh.redis.items():
        for origin in mesh.redis:
            if origin != region:
                mirror = mesh.names.mirror(origin)
                wait_for(partial(settled, client, mirror), what=f"{mirror} in {region}")


@pytest.mark.e2e
def test_forged_envelopes_do_no_more_than_a_local_producer_could(
    mesh: Mesh, namespace: str
) -> None:
    names, west = mesh.names, mesh.redis["eu-west"]
    bystanders = [f"{namespace}:bystander:{i}" for i in range(100)]
    west.mset(dict.fromkeys(bystanders, b"1"))
    warm_up(mesh, namespace)
    before = mesh.state("eu-west")
    wanted = f"{namespace}:forged-but-valid"
    west.set(wanted, b"1")
    refused = {  # what the dead letter's reason says, by event
        "before its first wildcard": Invalidation("9-1", "unlink", [], pattern="*"),
        "could match the gateway's own keys": Invalidation(
            "9-2", "unlink", [], pattern=f"{names.namespace}:*"
        ),
        "belongs to the gateway": Invalidation(
            "9-3", "unlink", [names.dead_letters, names.epoch, names.local_stream]
        ),
        "over the limit of 1000 per entry": Invalidation(
            "9-4", "unlink", [f"{namespace}:k{i}" for i in range(1001)]
        ),
        "bytes, over the limit of 1024": Invalidation(
            "9-5", "unlink", [f"{namespace}:" + "k" * 2000]
        ),
    }
    entry_id = forge(
        mesh, "eu-west", "us-east", [*refused.values(), Invalidation("9-6", "unlink", [wanted])]
    )
    gone_everywhere(mesh, [wanted])  # the valid event of the same envelope is applied

    def letters_in() -> list[dict[bytes, bytes]]:
        return [f for f in mesh.dead_letters("eu-west") if f[b"dead.id"] == entry_id]

    wait_for(lambda: len(letters_in()) == len(refused), what="the refused events dead-lettered")
    by_event = {msgspec.json.decode(f[b"event"])[0]: f for f in letters_in()}
    for reason, event in refused.items():
        letter = by_event[event.id]
        assert letter[b"origin"] == b"us-east"
        assert reason.encode() in letter[b"dead.reason"], letter[b"dead.reason"]
    assert int(west.exists(*bystanders)) == len(bystanders)
    after = mesh.state("eu-west")
    assert after["epoch"] == before["epoch"]
    assert after["groups"] == before["groups"]
    assert mesh.all_running()


@pytest.mark.e2e
def test_an_envelope_repeating_a_pattern_event_is_still_acknowledged(
    mesh: Mesh, namespace: str
) -> None:
    """Two pattern events with one ID in one envelope make one walk; the entry must not stay
    pending for ever (it would pin the mirror stream and look like a stuck link)."""
    west, names = mesh.redis["eu-west"], mesh.names
    keys = [f"{namespace}:p:{i}" for i in range(10)]
    west.mset(dict.fromkeys(keys, b"1"))
    warm_up(mesh, namespace)
    twice = Invalidation("9-9", "unlink", [], pattern=f"{namespace}:p:*")
    forge(mesh, "eu-west", "us-east", [twice, twice])
    mirror = names.mirror("us-east")
    wait_for(partial(_none_exist, west, keys), what="the pattern walked")
    wait_for(partial(settled, west, mirror), what="the forged entry acknowledged")
    assert mesh.all_running()


# --- fuzz: anything a peer can XADD into its mirror stream ----------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)


def events(names: Names, namespace: str) -> st.SearchStrategy[Invalidation]:
    """Invalidations near and past every limit, aimed at allowed and forbidden keys."""
    allowed = [f"{namespace}:fz:{i}" for i in range(4)]
    forbidden = [
        names.dead_letters,
        names.epoch,
        names.status,
        names.local_stream,
        names.mirror("us-east"),
        names.namespace,
    ]
    keys = st.one_of(st.sampled_from(allowed + forbidden), TEXT)
    patterns = st.one_of(
        st.sampled_from(
            [
                "*",
                "?*",
                f"{names.namespace}:*",
                f"[{names.namespace[0]}]*",
                f"{namespace}:fz:*",
                "\\*",
                "[",
                "[^a-",
                "{x}:*",
            ]
        ),
        TEXT,
    )
    return st.builds(
        Invalidation,
        id=st.sampled_from(["1-1", "99999999999999-0", "1-18446744073709551615"]),
        op=st.sampled_from(["unlink", "expire", "hybrid", "invalidate"]),
        keys=st.lists(keys, max_size=5),
        traceparent=st.one_of(st.none(), TEXT, st.just("00-" + "f" * 32 + "-" + "f" * 16 + "-01")),
        source=st.one_of(st.none(), TEXT),
        pattern=st.one_of(st.none(), patterns),
        version=st.one_of(st.none(), st.sampled_from(["0", "7", "01", "x", "1" * 40])),
    )


class Fuzzed:
    def __init__(self, mesh: Mesh, namespace: str) -> None:
        self.mesh = mesh
        self.namespace = namespace
        self.events = events(mesh.names, namespace)


@pytest.fixture(scope="module")
def fuzzed(
    session_servers: list[RedisServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzed]:
    namespace = f"hz{uuid.uuid4().hex[:8]}"
    processes = Processes(Path(tmp_path_factory.mktemp("hostile-fuzz")))
    configs = make_configs(urls_of(session_servers), namespace)
    try:
        mesh = Mesh({"eu-west": configs["eu-west"]}, processes)
        try:
            yield Fuzzed(mesh, namespace)
        finally:
            mesh.close()
    finally:
        processes.close()


@st.composite
def envelope_bytes(draw: st.DrawFn, fuzzed: Fuzzed) -> bytes:
    """A mirror entry's payload: an envelope from the right origin or another, or any bytes."""
    kind = draw(st.sampled_from(["batch", "batch", "raw", "other-origin"]))
    if kind == "raw":
        return draw(st.binary(max_size=64))
    origin = "us-east" if kind == "batch" else draw(st.sampled_from(["ap-south", "evil", ""]))
    batch = Batch(
        origin=origin,
        epoch=draw(TEXT),
        prev=draw(st.sampled_from(["0-0", "1-0", "x"])),
        events=draw(st.lists(fuzzed.events, max_size=4)),
        sent_ms=draw(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
        gap_from=draw(st.one_of(st.none(), st.just("1-0"))),
        gap_to=draw(st.one_of(st.none(), st.just("2-0"))),
    )
    return encode_envelope(batch)


@pytest.mark.e2e
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_envelopes_never_crash_a_receiver_nor_reach_past_a_producer(
    fuzzed: Fuzzed, data: st.DataObject
) -> None:
    mesh, names = fuzzed.mesh, fuzzed.mesh.names
    west = mesh.redis["eu-west"]
    sentinel = f"{fuzzed.namespace}:keep:{uuid.uuid4().hex}"
    west.set(sentinel, b"1")
    payloads = data.draw(st.lists(envelope_bytes(fuzzed), min_size=1, max_size=3))
    field = data.draw(st.sampled_from([ENVELOPE_FIELD, b"x"]))
    for payload in payloads:
        west.xadd(names.mirror("us-east"), {field: payload})
    mirror = names.mirror("us-east")
    wait_for(lambda: settled(west, mirror), what="eu-west to take every forged entry")
    assert mesh.gateways["eu-west"].running
    assert int(west.exists(sentinel)) == 1
    assert west.get(names.epoch) is not None
    groups = {info["name"] for info in west.xinfo_groups(names.local_stream)}
    assert APPLY_GROUP.encode() in groups
    west.delete(sentinel)


def test_every_event_the_fuzz_accepts_is_one_a_producer_could_write() -> None:
    """The receiver's check and the producer's parse agree: an event passes the receiver only if
    an entry a producer could XADD would give the same invalidation."""
    limits = GUARD

    @settings(max_examples=300, deadline=None)
    @given(event=events(Names("invalgw", "invalidations"), "app"))
    def agree(event: Invalidation) -> None:
        try:
            check_invalidation(event, limits)
        except InvalidEntry:
            return
        fields = entry_fields(
            event.keys,
            op=event.op,
            pattern=event.pattern,
            version=event.version,
            traceparent=event.traceparent,
            source=event.source,
        )
        stored = {name.encode(): value.encode() for name, value in fields.items()}
        as_written = parse_entry(event.id, stored, limits)
        blank = {"traceparent": event.traceparent or None, "source": event.source or None}
        assert as_written == msgspec.structs.replace(event, **blank)

    agree()
