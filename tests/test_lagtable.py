"""The lag table: what it reads from the regions' Redis, and how it shows it."""

from __future__ import annotations

import re

import pytest

from invalgw.config import RegionConfig
from invalgw.ops.lagtable import (
    LagCollector,
    LinkRow,
    RegionRow,
    Snapshot,
    link_state,
    render_json,
    render_text,
)
from invalgw.producer import Invalidator
from tests.conftest import REGIONS, clients, running, wait_until


def row(**fields: object) -> LinkRow:
    defaults: dict[str, object] = {
        "origin": "us-east",
        "region": "eu-west",
        "state": "",
        "status_age_ms": 200.0,
        "heartbeat_age_ms": 20.0,
        "backlog": 0,
        "mirror_backlog": 0,
        "lag_p99_ms": 5.0,
    }
    return LinkRow(**{**defaults, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "previous", "state"),
    [
        ({}, None, "ok"),
        ({"status_age_ms": None}, None, "waiting"),
        ({"status_age_ms": 10_000.0}, None, "stale"),
        ({"heartbeat_age_ms": 10_000.0}, None, "silent"),
        ({"backlog": 5000}, None, "behind"),
        ({"backlog": 5000}, {"backlog": 4000}, "behind"),
        ({"backlog": 5000}, {"backlog": 9000}, "catch-up"),
        ({"mirror_backlog": 5000}, {"mirror_backlog": 9000}, "catch-up"),
        ({"lag_p99_ms": 4000.0}, None, "catch-up"),
    ],
)
def test_link_state_names_what_the_operator_should_look_at(
    fields: dict[str, object], previous: dict[str, object] | None, state: str
) -> None:
    before = None if previous is None else row(**previous)
    assert link_state(row(**fields), before) == state


def snapshot() -> Snapshot:
    links = [
        row(origin=o, region=r, state="ok", applied=10, applied_per_s=300.0, lag_p50_ms=1.5)
        for o in REGIONS
        for r in REGIONS
    ]
    regions = [
        RegionRow(region=r, redis="127.0.0.1:1", reachable=True, dead_letters=0, gaps=2)
        for r in REGIONS
    ]
    return Snapshot(taken_at=0.0, links=links, regions=regions)


def test_text_has_a_row_per_pair_and_drops_the_mirror_column_when_narrow() -> None:
    wide = render_text(snapshot())
    assert sum(" → " in line for line in wide) == 1 + 9  # header and every pair
    assert re.search(r"^us-east → eu-west +ok +300 +1.5 ms +5.0 ms", "\n".join(wide), re.M)
    assert "MIRROR" in wide[0]

    narrow = render_text(snapshot(), width=80)
    assert "MIRROR" not in narrow[0]
    assert max(len(line) for line in narrow) <= 80
    assert not any("\x1b[" in line for line in narrow)  # colours only when asked
    assert any("\x1b[32mok" in line for line in render_text(snapshot(), color=True))


def test_json_round_trips_every_row() -> None:
    import msgspec

    decoded = msgspec.json.decode(render_json(snapshot()), type=Snapshot)
    assert decoded == snapshot()


@pytest.mark.anyio
async def test_a_region_whose_gateway_never_ran_shows_what_piles_up_and_where(
    configs: dict[str, RegionConfig],
) -> None:
    """ap-south's gateway never runs: its own entries wait, and nothing arrives there."""
    running_regions = ("us-east", "eu-west")
    collector = LagCollector.from_configs(list(configs.values()))
    async with (
        clients(configs) as redis_by_region,
        running(configs, *running_regions),
        collector,
    ):
        for region in REGIONS:
            stream = configs[region].streams.local
            invalidator = Invalidator(redis_by_region[region], stream=stream)
            for i in range(20):
                await invalidator.invalidate(f"{configs[region].streams.namespace}-key:k{i}")

        async def delivered() -> bool:
            links = (await collector.collect()).links
            return all(  # a sender saves its cursor up to 100 ms after the peer confirmed
                link.applied == 20
                and link.backlog == 0
                and (link.origin == link.region or link.heartbeat_age_ms is not None)
                for link in links
                if link.origin in running_regions and link.region in running_regions
            )

        await wait_until(delivered, what="us-east and eu-west to apply each other's entries")
        table = await collector.collect()

    links = {(link.origin, link.region): link for link in table.links}
    assert sorted(links) == sorted((o, r) for o in REGIONS for r in REGIONS)
    between_running = [links[(o, r)] for o in running_regions for r in running_regions]
    assert [link.state for link in between_running] == ["ok"] * 4
    assert all(link.backlog == 0 for link in between_running)
    # ap-south's own entries: nobody applies them, nobody forwards them
    assert [links[("ap-south", r)].backlog for r in REGIONS] == [20, 20, 20]
    assert [links[("ap-south", r)].state for r in REGIONS] == ["waiting"] * 3
    # what us-east sent to ap-south sits in ap-south's mirror, unapplied
    assert links[("us-east", "ap-south")].state == "waiting"
    assert links[("us-east", "ap-south")].backlog == 0
    mirror_backlog = links[("us-east", "ap-south")].mirror_backlog
    assert mirror_backlog is not None
    assert mirror_backlog >= 1
    regions = {region.region: region for region in table.regions}
    assert regions["ap-south"].stream_length == 20
    assert all(region.dead_letters == 0 and region.gaps == 0 for region in table.regions)
