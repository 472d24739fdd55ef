"""A local Redis Cluster for the tests: three primaries, no replicas, on free ports."""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from invalgw.config import RegionConfig
from invalgw.dev.localredis import RedisProcess, port_in_use
from tests.processes import die_with_parent


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, both below the kernel's range of
    ephemeral ports: a port in that range can be taken at any moment by an outgoing connection
    (seen here: the bus port's bind failed with "Address already in use")."""
    top = _ephemeral_start() - 10_000
    while True:
        port = random.randint(10_000, top - 1)
        if not port_in_use(port) and not port_in_use(port + 10000):
            return port


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _start_node() -> RedisProcess:
    """One cluster-enabled server; tries other ports if one is taken while it starts."""
    for attempt in range(3):
        node = RedisProcess(
            cluster_port(),
            args=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"),
            preexec=die_with_parent,
        )
        node.args += ("--cluster-config-file", f"nodes-{node.port}.conf")
        try:
            return node.start()
        except RuntimeError:
            node.cleanup()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def redis_cluster(primaries: int = 3) -> Iterator[list[RedisProcess]]:
    """Start ``primaries`` cluster-enabled servers, join them, wait until the cluster is ok."""
    nodes: list[RedisProcess] = []
    try:
        while len(nodes) < primaries:  # one by one: those started are stopped if one fails
            nodes.append(_start_node())
        subprocess.run(
            [
                shutil.which("redis-cli") or "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        _wait_ok(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


@contextlib.contextmanager
def replica_of(primary: RedisProcess, timeout_s: float = 20.0) -> Iterator[RedisProcess]:
    """A new node, joined to ``primary``'s cluster as its replica, in sync and known to every
    node as its replica (so they vote for it when ``primary`` fails)."""
    replica = _start_node()
    try:
        primary_id = _command(primary, "CLUSTER", "MYID").decode()
        _command(replica, "CLUSTER", "MEET", "127.0.0.1", str(primary.port))
        deadline = time.monotonic() + timeout_s
        while True:  # REPLICATE needs the primary in the new node's table first
            try:
                _command(replica, "CLUSTER", "REPLICATE", primary_id)
                break
            except redis.ResponseError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        peers = _command(primary, "CLUSTER", "NODES").decode().splitlines()
        ports = [int(line.split()[1].split(":")[1].split("@")[0]) for line in peers]
        replica_id = _command(replica, "CLUSTER", "MYID").decode()
        for port in ports:
            while not _knows_replica(port, replica_id, primary_id):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {port} does not know the replica yet")
                time.sleep(0.05)
        while _command(replica, "INFO", "replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise TimeoutError("the replica is not in sync")
            time.sleep(0.05)
        yield replica
    finally:
        replica.cleanup()


def _knows_replica(port: int, replica_id: str, primary_id: str) -> bool:
    """Whether the node at ``port`` lists ``replica_id`` as a replica of ``primary_id``."""
    client = redis.Redis(port=port, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    try:
        table: bytes = client.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    for line in table.decode().splitlines():
        node_id, _address, flags, primary, *_rest = line.split()
        if node_id == replica_id:
            return "slave" in flags.split(",") and primary == primary_id
    return False


def _command(node: RedisProcess, *args: str) -> Any:
    client = redis.Redis(port=node.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


def _wait_ok(nodes: list[RedisProcess], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    for node in nodes:
        client = redis.Redis(
            port=node.port,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while not _state_ok(client):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster node {node.port} not ok after {timeout_s}s")
                time.sleep(0.05)
        finally:
            client.close()


def _state_ok(client: redis.Redis) -> bool:
    reply: bytes = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    return b"cluster_state:ok" in reply


def cluster_client(node: RedisProcess) -> redis.asyncio.RedisCluster:
    """A test's asyncio cluster client, entering the cluster at ``node``."""
    return redis.asyncio.RedisCluster.from_url(
        f"redis://127.0.0.1:{node.port}/0",
        socket_timeout=5,
        socket_connect_timeout=2,
        retry=redis.asyncio.retry.Retry(NoBackoff(), 1),
    )


def partitioned_on_cluster(
    configs: dict[str, RegionConfig], partitions: int, *, lease_ms: int | None = None
) -> dict[str, RegionConfig]:
    """``configs`` (us-east on a cluster's URL, eu-west on a standalone Redis) with us-east's
    stream in ``partitions`` partitions on that cluster, and eu-west told so."""
    us_east, eu_west = configs["us-east"], configs["eu-west"]
    gateway = us_east.gateway
    if lease_ms is not None:
        gateway = msgspec.structs.replace(gateway, lease_ms=lease_ms)
    us_east = msgspec.structs.replace(
        us_east,
        redis=msgspec.structs.replace(us_east.redis, cluster=True),
        streams=msgspec.structs.replace(us_east.streams, partitions=partitions),
        gateway=gateway,
    )
    peer = msgspec.structs.replace(eu_west.peers[0], partitions=partitions, cluster=True)
    return {"us-east": us_east, "eu-west": msgspec.structs.replace(eu_west, peers=[peer])}
