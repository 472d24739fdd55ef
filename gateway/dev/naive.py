"""BASELINE ONLY, not part of the gateway: the naive per-event forwarder ``invalgw bench`` races.

What one would write first: read the region's stream with a consumer group and, for every event,
one UNLINK here, one UNLINK in each peer region, then one XACK, each its own redis-py command
and round trip. It is at-least-once (XACK after the effects), does no batching, no envelopes, no
dedup, no gap checks and no validation beyond splitting ``keys``, so it is the cheapest honest
per-event design: the yardstick the batching gateway is measured against.

Run one per region: ``python -m invalgw.dev.naive --config regions/us-east.toml``; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import redis

from invalgw.config import RedisEndpoint, load_config
from invalgw.connections import connect_sync

GROUP = "naive"
BLOCK_MS = 1000
READ_COUNT = 100


class Stop(Exception):
    """Raised from the SIGTERM handler to leave the loop."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stop


def _client(endpoint: RedisEndpoint, name: str) -> redis.Redis:
    return connect_sync(endpoint, name=name)


def forward(config_path: str) -> int:
    config = load_config(config_path)
    local = _client(config.redis, f"naive:{config.region}")
    peers = [_client(peer, f"naive:{config.region}:to:{peer.name}") for peer in config.peers]
    stream = config.streams.local
    try:
        local.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    cursor = "0"  # this consumer's pending entries first, then new ones
    try:
        while True:
            reply: Any = local.xreadgroup(
                GROUP,
                "naive",
                {stream: cursor},
                count=READ_COUNT,
                block=None if cursor == "0" else BLOCK_MS,
            )
            entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1] if reply else []
            if cursor == "0" and not entries:
                cursor = ">"
            for entry_id, fields in entries:
                keys = fields.get(b"keys", b"").split()
                if keys:
                    local.unlink(*keys)
                    for peer in peers:
                        peer.unlink(*keys)
                local.xack(stream, GROUP, entry_id)
    except (Stop, KeyboardInterrupt):
        return 0
    finally:
        for client in (local, *peers):
            client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m invalgw.dev.naive",
        description="Baseline for invalgw bench: a per-event forwarder with no batching.",
    )
    parser.add_argument("--config", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    return forward(args.config)


if __name__ == "__main__":
    raise SystemExit(main())
