"""Load and observation for ``invalgw bench``: cache keys, producers, and "gone" watchers.

Invalidation ``i`` of a run removes the keys ``<prefix>:<2i>`` and ``<prefix>:<2i+1>``, the names
``DEBUG POPULATE`` gives. The producers speak RESP over a plain socket with pre-encoded commands,
so the load generator spends as little of the machine's CPU as it can; what they write is exactly
the producer contract (:func:`invalgw.proto.entry_fields`).

"Gone" is observed from outside the system under test: :func:`wait_gone` polls EXISTS, and the
subscriber (``python -m invalgw.dev.benchload subscribe``, one process per region) timestamps every
``del`` keyspace event on this host's monotonic clock, the clock the producer stamps sends with.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hiredis
import msgspec
import redis

from invalgw.proto import entry_fields

DEL_EVENTS = "__keyevent@0__:del"
"""Channel of ``del`` events in db 0 (``notify-keyspace-events Eg``); UNLINK fires them too."""
STOP = b"invalgw-bench:stop"
"""Published on :data:`DEL_EVENTS` to tell a subscriber its run is over."""
CHUNK = 1000


def keys_of(prefix: str, index: int) -> tuple[str, str]:
    """The two cache keys invalidation ``index`` removes."""
    return f"{prefix}:{2 * index}", f"{prefix}:{2 * index + 1}"


class RawConnection:
    """A blocking RESP connection to 127.0.0.1: send pre-encoded commands, count the replies."""

    def __init__(self, port: int, *, timeout_s: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()

    def send(self, payload: bytes) -> None:
        self.sock.sendall(payload)

    def replies(self, count: int) -> list[Any]:
        """Read ``count`` replies; raise the first error reply."""
        out: list[Any] = []
        while len(out) < count:
            reply = self.reader.gets()
            if reply is False:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                self.reader.feed(data)
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise redis.ResponseError(str(reply))
            out.append(reply)
        return out

    def call(self, *args: str | bytes | int) -> Any:
        self.send(hiredis.pack_command(args))  # type: ignore[arg-type]
        return self.replies(1)[0]

    def close(self) -> None:
        self.sock.close()


def xadd_commands(stream: str, prefix: str, count: int) -> list[bytes]:
    """Pre-encoded ``XADD stream * <contract fields>`` for invalidations 0 .. count-1."""
    commands = []
    for index in range(count):
        fields = entry_fields(keys_of(prefix, index))
        args: list[str] = ["XADD", stream, "*"]
        for name, value in fields.items():
            args += [name, value]
        commands.append(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]
    return commands


def populate(port: int, prefix: str, invalidations: int, *, use_debug: bool) -> None:
    """Create the keys of ``invalidations`` invalidations (``DEBUG POPULATE``, else MSET)."""
    conn = RawConnection(port, timeout_s=120)
    try:
        if use_debug:
            conn.call("DEBUG", "POPULATE", 2 * invalidations, prefix, 8)
            return
        pending = 0
        for start in range(0, 2 * invalidations, CHUNK):
            args: list[str] = ["MSET"]
            for n in range(start, min(start + CHUNK, 2 * invalidations)):
                args += [f"{prefix}:{n}", "value"]
            conn.send(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]
            pending += 1
            if pending == 100:
                conn.replies(pending)
                pending = 0
        conn.replies(pending)
    finally:
        conn.close()


def produce_all(port: int, commands: Sequence[bytes]) -> tuple[float, float]:
    """Send every command as fast as one pipelined connection can; (start, end) monotonic times.

    Two chunks are in flight at a time, so Redis always has the next chunk to read.
    """
    conn = RawConnection(port)
    try:
        chunks = [b"".join(commands[i : i + CHUNK]) for i in range(0, len(commands), CHUNK)]
        sizes = [min(CHUNK, len(commands) - i) for i in range(0, len(commands), CHUNK)]
        start = time.monotonic()
        in_flight: list[int] = []
        for chunk, size in zip(chunks, sizes, strict=True):
            conn.send(chunk)
            in_flight.append(size)
            if len(in_flight) == 2:
                conn.replies(in_flight.pop(0))
        for size in in_flight:
            conn.replies(size)
        return start, time.monotonic()
    finally:
        conn.close()


def produce_paced(port: int, commands: Sequence[bytes], rate: float) -> tuple[list[float], float]:
    """Send ``commands`` at ``rate`` per second; returns each one's send time and the run time.

    Every millisecond or so the commands due by then go out in one write, stamped with the
    monotonic time of that write.
    """
    conn = RawConnection(port)
    sent_at: list[float] = []
    try:
        start = time.monotonic()
        total = len(commands)
        while len(sent_at) < total:
            now = time.monotonic()
            due = min(total, int((now - start) * rate) + 1)
            first = len(sent_at)
            if due > first:
                stamp = time.monotonic()
                conn.send(b"".join(commands[first:due]))
                sent_at.extend([stamp] * (due - first))
                conn.replies(due - first)
            wake = start + len(sent_at) / rate
            pause = wake - time.monotonic()
            if pause > 0:
                time.sleep(max(pause, 0.0005))
        return sent_at, time.monotonic() - start
    finally:
        conn.close()


def wait_gone(
    clients: dict[str, redis.Redis],
    keys: Sequence[str],
    *,
    timeout_s: float,
    poll_s: float = 0.002,
) -> dict[str, float]:
    """Poll until none of ``keys`` exists in each region; the monotonic time each got there.

    Raises ``TimeoutError`` naming the regions that still hold some of the keys.
    """
    gone: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(gone) < len(clients):
        for region, client in clients.items():
            if region not in gone and not client.exists(*keys):
                gone[region] = time.monotonic()
        if len(gone) < len(clients):
            if time.monotonic() > deadline:
                waiting = ", ".join(sorted(set(clients) - set(gone)))
                raise TimeoutError(f"keys still present after {timeout_s:g} s in: {waiting}")
            time.sleep(poll_s)
    return gone


def count_left(client: redis.Redis, prefix: str) -> int:
    """How many ``<prefix>:*`` keys are left (SCAN; for checking a run, never timed)."""
    return sum(1 for _ in client.scan_iter(match=f"{prefix}:*", count=10_000))


def subscribe(port: int, prefix: str, out: Path) -> int:
    """Record when each invalidation's keys were deleted, until :data:`STOP` is published.

    Writes ``{invalidation index: monotonic time its second key went}`` as MessagePack.
    """
    conn = RawConnection(port, timeout_s=600)
    conn.call("SUBSCRIBE", DEL_EVENTS)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    marker = f"{prefix}:".encode()
    skip = len(marker)
    gone: dict[int, float] = {}
    reader = conn.reader
    while True:
        data = conn.sock.recv(1 << 20)
        stamp = time.monotonic()
        if not data:
            break
        reader.feed(data)
        message = reader.gets()
        stop = False
        while message is not False:
            key = message[2]
            if key.startswith(marker):
                index = int(key[skip:]) >> 1
                if gone.get(index, 0.0) < stamp:
                    gone[index] = stamp
            elif key == STOP:
                stop = True
            message = reader.gets()
        if stop:
            break
    conn.close()
    out.write_bytes(msgspec.msgpack.encode(gone))
    return 0


def read_gone(path: Path) -> dict[int, float]:
    return msgspec.msgpack.decode(path.read_bytes(), type=dict[int, float])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m invalgw.dev.benchload")
    commands = parser.add_subparsers(required=True)
    sub = commands.add_parser("subscribe", help="record del events of one region (bench use)")
    sub.add_argument("--port", type=int, required=True)
    sub.add_argument("--prefix", required=True)
    sub.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    return subscribe(args.port, args.prefix, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
