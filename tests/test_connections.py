"""Clients from gateway.connections reach Redis over every URL scheme the config accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import RedisEndpoint
from gateway.connections import connect, connect_sync
from tests.servers import docker_available, redis_servers

pytestmark = pytest.mark.anyio


@pytest.mark.skipif(docker_available(), reason="needs a local redis-server's unix socket")
async def test_unix_socket_urls_connect(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    with redis_servers(1, "--unixsocket", str(socket_path)):
        endpoint = RedisEndpoint(url=f"unix://{socket_path}")
        client = connect(endpoint, name="invalgw:test")
        try:
            assert await client.ping()
        finally:
            await client.aclose()
        sync_client = connect_sync(endpoint, name="invalgw:test")
        try:
            assert sync_client.ping()
        finally:
            sync_client.close()
