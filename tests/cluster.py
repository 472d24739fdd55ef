"""A local Redis Cluster for the tests: three primaries, no replicas, on free ports."""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import time
from collections.abc import Iterator

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

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
