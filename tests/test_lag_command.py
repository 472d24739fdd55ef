"""invalgw lag: the operator's table, read from Redis, with gateways running or not."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

from invalgw.config import RegionConfig
from invalgw.producer import Invalidator
from tests.conftest import clients, running, wait_gone, wait_until, write_config

pytestmark = pytest.mark.anyio


async def lag_json(paths: list[Path]) -> dict[str, object]:
    argv = [sys.executable, "-m", "invalgw", "lag", "--json"]
    for path in paths:
        argv += ["--config", str(path)]
    result = await anyio.run_process(argv, check=False)
    assert result.returncode == 0, result.stderr.decode()
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


async def test_lag_shows_every_pair_and_a_stopped_region(
    configs: dict[str, RegionConfig], namespace: str, tmp_path: Path
) -> None:
    paths = [write_config(tmp_path / f"{name}.toml", config) for name, config in configs.items()]
    key = f"{namespace}:k"
    async with clients(configs) as redis_by_region:
        async with running(configs):
            for client in redis_by_region.values():
                await client.set(key, "v")
            invalidator = Invalidator(
                redis_by_region["us-east"], stream=configs["us-east"].streams.local
            )
            await invalidator.invalidate(key)
            for region, client in redis_by_region.items():
                await wait_gone(client, [key], region=region)
            snapshot: dict[str, object] = {}

            async def every_pair_ok() -> bool:
                snapshot.update(await lag_json(paths))
                links = snapshot["links"]
                assert isinstance(links, list)
                return len(links) == 9 and all(link["state"] == "ok" for link in links)

            await wait_until(every_pair_ok, seconds=15, interval=0.3, what="all 9 pairs ok")
            links = snapshot["links"]
            assert isinstance(links, list)
            east_to_west = next(
                link for link in links if (link["origin"], link["region"]) == ("us-east", "eu-west")
            )
            assert east_to_west["backlog"] == 0
            assert east_to_west["applied"] >= 1
            assert east_to_west["heartbeat_age_ms"] < 3000

        # every gateway stopped: the table still reads from Redis
        await invalidator.invalidate(key)
        stopped = await lag_json(paths)
        links = stopped["links"]
        assert isinstance(links, list)
        east_to_west = next(
            link for link in links if (link["origin"], link["region"]) == ("us-east", "eu-west")
        )
        assert east_to_west["backlog"] == 1  # written, not yet delivered: nobody forwards it
