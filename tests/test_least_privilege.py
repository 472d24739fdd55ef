"""Least privilege: the users ``invalgw acl`` prints, applied to real Redis servers.

A peer's credential may deliver into its own mirror stream (FCALL of the gateway's function, and
the HGET/HSET/XADD it runs on its two keys) and nothing else: every other command tried is refused
with NOPERM. A producer's credential may XADD into the region's stream only. The gateways run as
processes with the printed users, peers' URLs carrying the peer users.

Delivery through the Redis Function (``FCALL invalgw_append``) comes with the forwarder; until
the forwarder uses it, the tests that need a working delivery under the peer users are skipped
(:func:`fcall_delivery`).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from invalgw.cli import main
from invalgw.config import RegionConfig
from invalgw.names import Names
from invalgw.ops.acl import topology_acl
from invalgw.proto import entry_fields
from tests.conftest import REGIONS, make_configs, write_config
from tests.processes import Processes, wait_for
from tests.servers import RedisServer


def with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{user}:{password}@{parts.netloc}").geturl()


def least_privilege_configs(servers: list[RedisServer], namespace: str) -> dict[str, RegionConfig]:
    """Each gateway with its own user; each peer URL with the peer user made for its origin."""
    plain = {region: server.url for region, server in zip(REGIONS, servers, strict=True)}
    urls = {
        region: with_user(url, f"invalgw-{region}", f"s3cret-gw-{region}")
        for region, url in plain.items()
    }
    peer_urls = {
        origin: {
            region: with_user(
                plain[region], f"invalgw-peer-{origin}", f"s3cret-peer-{origin}-{region}"
            )
            for region in REGIONS
            if region != origin
        }
        for origin in REGIONS
    }
    return make_configs(urls, namespace, peer_urls=peer_urls)


def admin(server: RedisServer) -> redis.Redis:
    client: redis.Redis = redis.Redis.from_url(
        server.url, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    return client


def apply_acl(lines: list[str], servers: dict[str, RedisServer]) -> None:
    """Run each region's ACL SETUSER lines on its Redis, as an operator pastes them."""
    region = ""
    for line in lines:
        if line.startswith("# ") and ": run on " in line:
            region = line[2:].split(":", 1)[0]
        elif line.startswith("ACL SETUSER"):
            client = admin(servers[region])
            try:
                client.execute_command(*line.split())  # type: ignore[no-untyped-call]
            finally:
                client.close()


def as_user(url: str) -> redis.Redis:
    client: redis.Redis = redis.Redis.from_url(
        url, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    return client


class Topology:
    def __init__(self, servers: list[RedisServer], namespace: str, workdir: Path) -> None:
        self.servers = dict(zip(REGIONS, servers, strict=True))
        self.configs = least_privilege_configs(servers, namespace)
        self.paths = {
            region: write_config(workdir / f"{region}.toml", config)
            for region, config in self.configs.items()
        }
        east = self.configs["us-east"]
        self.names = Names(east.streams.namespace, east.streams.local)
        self.lines = topology_acl(list(self.configs.values()), producer_user="producer")
        apply_acl(self.lines, self.servers)

    def peer(self, origin: str, region: str) -> redis.Redis:
        url = next(p.url for p in self.configs[origin].peers if p.name == region)
        return as_user(url)


@pytest.fixture
def topology(own_servers: list[RedisServer], namespace: str, tmp_path: Path) -> Topology:
    return Topology(own_servers, namespace, tmp_path)


@pytest.fixture
def processes_here(tmp_path: Path) -> Iterator[Processes]:
    made = Processes(tmp_path)
    try:
        yield made
    finally:
        made.close()


def _none_exist(client: redis.Redis, keys: list[str]) -> bool:
    return int(client.exists(*keys)) == 0


def refused(call: Any) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


def test_acl_prints_hashes_never_passwords(topology: Topology) -> None:
    text = "\n".join(topology.lines)
    for region in REGIONS:
        assert f"s3cret-gw-{region}" not in text
        assert f"ACL SETUSER invalgw-{region} reset on #" in text
    assert "s3cret" not in text
    assert text.count("ACL SETUSER invalgw-peer-") == 6  # every origin in every other region


def test_acl_command_prints_the_same_lines(
    topology: Topology, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["acl", "--producer-user", "producer"]
    for path in topology.paths.values():
        argv += ["--config", str(path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == topology.lines
    assert err == ""


def test_a_peer_credential_can_do_nothing_but_deliver(topology: Topology) -> None:
    names = topology.names
    peer = topology.peer("us-east", "eu-west")  # what us-east holds for eu-west's Redis
    owner = admin(topology.servers["eu-west"])
    try:
        owner.set("app:secret", "v")
        owner.xadd(names.local_stream, {"op": "unlink", "keys": "x"})
        mirror = names.mirror("us-east")
        attempts = {
            "GET": lambda: peer.get("app:secret"),
            "UNLINK": lambda: peer.unlink("app:secret"),
            "DEL own mirror": lambda: peer.delete(mirror),
            "SCAN": lambda: peer.scan(0),
            "KEYS": lambda: peer.keys("*"),
            "EVAL": lambda: peer.eval("while true do end", 0),
            "SCRIPT LOAD": lambda: peer.script_load("while true do end"),
            "FUNCTION LOAD": lambda: peer.function_load(
                "#!lua name=mine\nredis.register_function('f', function() return 1 end)"
            ),
            "FUNCTION DELETE": lambda: peer.function_delete("invalgw"),
            "XADD local stream": lambda: peer.xadd(names.local_stream, {"op": "unlink"}),
            "XADD dead letters": lambda: peer.xadd(names.dead_letters, {"x": "y"}),
            "XADD another mirror": lambda: peer.xadd(names.mirror("ap-south"), {"d": "x"}),
            "XADD any key": lambda: peer.xadd("app:stream", {"x": "y"}),
            "HSET another state": lambda: peer.hset(names.mirror_state("ap-south"), "a", "b"),
            "XRANGE own mirror": lambda: peer.xrange(mirror),
            "XREADGROUP": lambda: peer.xreadgroup("apply", "c", {mirror: ">"}),
            "SET": lambda: peer.set("app:secret", "forged"),
            "FLUSHALL": lambda: peer.flushall(),
            "CONFIG": lambda: peer.config_get("*"),
            "ACL": lambda: peer.acl_whoami(),
            "PUBLISH": lambda: peer.publish("ch", "x"),
        }
        allowed = [name for name, call in attempts.items() if not refused(call)]
        assert allowed == []
        assert owner.get("app:secret") == b"v"
        assert peer.ping()
        assert peer.time()
        assert peer.info("server")["redis_version"]
    finally:
        peer.close()
        owner.close()


STAND_IN = """#!lua name=invalgw
-- a stand-in with the delivery function's name and its commands (HGET, HSET, XADD on its keys)
redis.register_function('invalgw_append', function(keys, args)
  local last = redis.call('HGET', keys[2], 'last')
  redis.call('XADD', keys[1], 'MAXLEN', '~', '1000', '*', 'd', args[1])
  redis.call('HSET', keys[2], 'last', args[2])
  return last
end)
"""


def test_the_peer_user_may_fcall_on_its_own_keys_only(topology: Topology) -> None:
    """FCALL runs with the caller's rights: the peer user's are enough for the delivery
    function's commands on its own mirror and state, and for no other origin's."""
    names = topology.names
    owner = admin(topology.servers["eu-west"])
    peer = topology.peer("us-east", "eu-west")
    try:
        owner.function_load(STAND_IN, replace=True)
        own = [names.mirror("us-east"), names.mirror_state("us-east")]
        other = [names.mirror("ap-south"), names.mirror_state("ap-south")]
        assert peer.fcall("invalgw_append", 2, *own, "envelope", "1-0") is None
        assert peer.fcall("invalgw_append", 2, *own, "envelope", "2-0") == b"1-0"
        assert refused(lambda: peer.fcall("invalgw_append", 2, *other, "forged", "9-0"))
        assert owner.xlen(own[0]) == 2
        assert owner.exists(other[0]) == 0
    finally:
        owner.function_delete("invalgw")
        peer.close()
        owner.close()


def test_a_producer_credential_can_only_xadd_into_the_stream(topology: Topology) -> None:
    names = topology.names
    owner = admin(topology.servers["us-east"])
    owner.execute_command("ACL", "SETUSER", "producer", ">pw")  # type: ignore[no-untyped-call]
    producer = as_user(with_user(topology.servers["us-east"].url, "producer", "pw"))
    try:
        assert producer.xadd(names.local_stream, entry_fields(["app:k"]))  # type: ignore[arg-type]
        attempts = {
            "GET": lambda: producer.get("app:k"),
            "UNLINK": lambda: producer.unlink("app:k"),
            "XADD dead letters": lambda: producer.xadd(names.dead_letters, {"x": "y"}),
            "XADD mirror": lambda: producer.xadd(names.mirror("eu-west"), {"d": "x"}),
            "XTRIM": lambda: producer.xtrim(names.local_stream, maxlen=0),
            "XGROUP DESTROY": lambda: producer.xgroup_destroy(names.local_stream, "apply"),
            "EVAL": lambda: producer.eval("return 1", 0),
            "FCALL": lambda: producer.fcall("invalgw_append", 0),
        }
        assert [name for name, call in attempts.items() if not refused(call)] == []
    finally:
        producer.close()
        owner.close()


@pytest.mark.e2e
def test_a_gateway_runs_its_region_under_its_own_user(
    topology: Topology, processes_here: Processes, namespace: str
) -> None:
    """Local apply, pattern walks, dead letters and check work with the printed gateway user."""
    config = topology.configs["us-east"]
    assert main(["check", "--config", str(topology.paths["us-east"])]) == 0  # peers: PING, INFO
    gateway = processes_here.add("us-east", config).start().wait_ready()
    client = admin(topology.servers["us-east"])
    try:
        keys = [f"{namespace}:k{i}" for i in range(5)]
        prefix = f"{namespace}:{{g}}:".encode()
        group = [prefix + str(i).encode() for i in range(5)] + [prefix + b"\xff"]
        client.mset(dict.fromkeys(keys, b"1"))
        client.mset(dict.fromkeys(group, b"1"))
        client.xadd(config.streams.local, entry_fields(keys))  # type: ignore[arg-type]
        client.xadd(config.streams.local, entry_fields(pattern=f"{namespace}:{{g}}:*"))  # type: ignore[arg-type]
        client.xadd(config.streams.local, {"op": "explode", "keys": "x"})
        wait_for(lambda: int(client.exists(*keys, *group)) == 0, what="keys gone")
        wait_for(lambda: int(client.xlen(topology.names.dead_letters)) == 1, what="dead letter")
        assert gateway.running
        refusals = [line for line in gateway.log().splitlines() if "permission" in line]
        assert refusals == []  # its own user and the peer users suffice for everything it does
    finally:
        client.close()


@pytest.mark.e2e
def test_three_regions_run_with_the_least_privilege_users(
    topology: Topology, processes_here: Processes, namespace: str
) -> None:
    processes_here.start_all(topology.configs)
    owners = {region: admin(server) for region, server in topology.servers.items()}
    try:
        keys = {region: f"{namespace}:from:{region}" for region in REGIONS}
        for owner in owners.values():
            owner.mset(dict.fromkeys(keys.values(), b"1"))
        for region, key in keys.items():
            owners[region].xadd(topology.names.local_stream, entry_fields([key]))  # type: ignore[arg-type]
        for region, owner in owners.items():
            wait_for(
                partial(_none_exist, owner, list(keys.values())),
                seconds=20,
                what=f"every region's invalidation applied in {region}",
            )
        for process in processes_here.all:
            assert process.running
            assert "no permissions" not in process.log()
    finally:
        for owner in owners.values():
            owner.close()
