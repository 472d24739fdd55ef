"""Delivery through the Redis Function library ``invalgw``: each gateway loads it into its own
Redis; a peer's credential needs FCALL, not SCRIPT LOAD or EVAL."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from invalgw.config import RegionConfig
from invalgw.functions import ACK, APPEND, CLEAR_GAP, LIBRARY, SAVE_CURSOR, load_library
from invalgw.names import Names
from invalgw.proto import entry_fields
from tests.conftest import REGIONS, clients, make_configs, running, wait_gone, wait_until
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio


def urls_of(servers: list[RedisServer]) -> dict[str, str]:
    return {region: server.url for region, server in zip(REGIONS, servers, strict=True)}


def as_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}").geturl()


def pairs(reply: list[Any]) -> dict[bytes, Any]:
    """A RESP2 flat ``[name, value, …]`` reply as a dict."""
    return dict(zip(reply[::2], reply[1::2], strict=True))


async def test_each_gateway_loads_the_library_into_its_own_redis(
    configs: dict[str, RegionConfig],
) -> None:
    async with clients(configs) as redis_by_region:
        east = redis_by_region["us-east"]
        await east.function_flush()
        async with running(configs, "us-east"):
            [library] = await east.function_list(LIBRARY)
            functions = {pairs(f)[b"name"] for f in pairs(library)[b"functions"]}
            assert functions == {f.encode() for f in (APPEND, CLEAR_GAP, ACK, SAVE_CURSOR)}


async def test_a_peer_without_the_library_gets_it_from_its_own_gateway(
    own_servers: list[RedisServer], namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """us-east may only FCALL in eu-west (no FUNCTION, SCRIPT or EVAL): until eu-west's gateway
    starts and loads the library, us-east says why it cannot deliver, once, and keeps trying."""
    configs = make_configs(urls_of(own_servers), namespace)
    user = "sender"
    peer_url = as_user(configs["eu-west"].redis.url, user, "secret")
    configs = make_configs(
        urls_of(own_servers), namespace, peer_urls={"us-east": {"eu-west": peer_url}}
    )
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    key = f"{namespace}:k"
    async with clients(configs) as redis_by_region:
        west = redis_by_region["eu-west"]
        await west.acl_setuser(
            user,
            enabled=True,
            passwords=["+secret"],
            keys=["*"],
            commands=["+@all", "-function", "-script", "-eval", "-evalsha", "-eval_ro"],
        )
        for client in redis_by_region.values():
            await client.set(key, "cached")
        async with running(configs, "us-east"):
            await redis_by_region["us-east"].xadd(names.local_stream, entry_fields([key]))  # type: ignore[arg-type]
            await wait_gone(redis_by_region["us-east"], [key], region="us-east")

            async def explained() -> bool:
                return "peer eu-west has no invalgw function yet" in caplog.text

            await wait_until(explained, what="us-east to say why eu-west gets nothing")
            assert await west.exists(key) == 1
            async with running({"eu-west": configs["eu-west"]}):
                await wait_gone(west, [key], region="eu-west")
        assert caplog.text.count("peer eu-west has no invalgw function yet") == 1


async def test_append_refuses_what_it_has_and_what_does_not_follow(
    configs: dict[str, RegionConfig], namespace: str
) -> None:
    """A batch the peer has is a duplicate; an envelope following an origin ID the peer does not
    hold (an earlier one pipelined before it failed) is refused as behind, not appended."""
    names = Names(configs["us-east"].streams.namespace, configs["us-east"].streams.local)
    keys = [names.mirror("us-east"), names.mirror_state("us-east")]
    async with clients(configs) as redis_by_region:
        west = redis_by_region["eu-west"]
        await load_library(west)

        async def append(kind: str, last: str, *prev: str) -> list[bytes]:
            args = [kind, "e1", last, b"x", 100, *prev]
            reply: list[bytes] = await west.fcall(APPEND, 2, *keys, *args)
            return reply

        assert await append("batch", "1-5", "0-0") == [b"ok", b"1-5"]
        assert await append("batch", "1-5", "0-0") == [b"duplicate", b"1-5"]
        assert await append("batch", "1-9", "1-7") == [b"behind", b"1-5"]
        assert await append("notice", "1-7", "1-7") == [b"behind", b"1-5"]
        assert await append("batch", "1-9", "1-5") == [b"ok", b"1-9"]
        assert await append("batch", "1-12", "1-7") == [b"ok", b"1-12"]  # overlaps: appended
        assert await append("notice", "1-12", "1-12") == [b"ok", b"1-12"]
        assert await append("batch", "1-20") == [b"ok", b"1-20"]  # no check asked
        assert await west.xlen(keys[0]) == 5
