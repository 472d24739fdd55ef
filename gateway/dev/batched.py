"""BASELINE ONLY, not part of the gateway: the batched forwarder ``invalgw bench`` measures against.

What a competent engineer writes by hand in a few dozen lines of redis-py, and the yardstick the
gateway has to justify its cost against. Per region, one process:

1. ``XREADGROUP COUNT 500 BLOCK 1000`` on the region's stream (its own pending entries first, so a
   restart resumes where it stopped);
2. the batch's keys, in one multi-key ``UNLINK`` per peer region, one pipelined round trip each;
3. one pipelined round trip to the region's own Redis: ``UNLINK`` of the same keys + ``XACK`` of
   the batch (acknowledged after the effects: at-least-once).

No mirror streams, no dedup, no gap detection, no heartbeats, no validation beyond splitting
``keys`` (on ``sep`` when given): it deletes remote keys itself, synchronously, over the WAN, and
a dead peer stops it for every region. Every client has explicit timeouts and retries, from the
region file (``invalgw.connections.connect_sync``).

Run one per region: ``python -m invalgw.dev.batched --config regions/us-east.toml``; prints
``ready`` once its consumer group exists; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import redis

from invalgw.config import load_config
from invalgw.connections import connect_sync

GROUP = "batched"
COUNT = 500
BLOCK_MS = 1000


class Stop(Exception):
    """Raised from the SIGTERM handler to leave the loop."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stop


def batch_keys(entries: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> list[bytes]:
    """Every key the batch's entries name, in order (``keys`` split on ``sep`` or whitespace)."""
    keys: list[bytes] = []
    for _entry_id, fields in entries:
        raw = fields.get(b"keys")
        if raw:
            sep = fields.get(b"sep")
            keys.extend(raw.split(sep) if sep else raw.split())
    return keys


def forward(config_path: str, count: int = COUNT) -> int:
    config = load_config(config_path)
    local = connect_sync(config.redis, name=f"batched:{config.region}")
    peers = [connect_sync(p, name=f"batched:{config.region}:to:{p.name}") for p in config.peers]
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
                config.region,
                {stream: cursor},
                count=count,
                block=None if cursor == "0" else BLOCK_MS,
            )
            entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1] if reply else []
            if not entries:
                cursor = ">"
                continue
            keys = batch_keys(entries)
            if keys:
                for peer in peers:
                    remote = peer.pipeline(transaction=False)
                    remote.unlink(*keys)
                    remote.execute()
            pipe = local.pipeline(transaction=False)
            if keys:
                pipe.unlink(*keys)
            pipe.xack(stream, GROUP, *(entry_id for entry_id, _ in entries))
            pipe.execute()
    except (Stop, KeyboardInterrupt):
        return 0
    finally:
        for client in (local, *peers):
            client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m invalgw.dev.batched",
        description="Baseline for invalgw bench: a hand-rolled batched forwarder (one region).",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the region's file")
    parser.add_argument(
        "--count", type=int, default=COUNT, metavar="N", help=f"entries per read (default {COUNT})"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    return forward(args.config, args.count)


if __name__ == "__main__":
    raise SystemExit(main())
