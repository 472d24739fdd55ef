"""Load and observation for ``invalgw bench``: cache keys, producers, and "gone" watchers.

Invalidation ``i`` of a run that removes ``k`` keys per invalidation removes the keys
``<prefix>:<k*i>`` .. ``<prefix>:<k*i+k-1>``, the names ``DEBUG POPULATE`` gives. The producers
speak RESP over a plain socket with pre-encoded commands, so the load generator spends as little
of the machine's CPU as it can; what they write is exactly the producer contract
(:func:`invalgw.proto.entry_fields`).

"Gone" is observed from outside the system under test: :func:`wait_gone` polls EXISTS, and the
subscriber (``python -m invalgw.dev.benchload subscribe``, one process per region) timestamps every
``del`` keyspace event on this host's monotonic clock, the clock the paced producer schedules its
sends on. Latency counts from each entry's *scheduled* send time, not from when the producer got
round to sending it: a producer that stalls (the machine is busy, a reply is slow) would otherwise
hide exactly the delays it caused (coordinated omission).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hiredis
import msgspec
import redis

from invalgw.proto import entry_fields, stream_for

DEL_EVENTS = "__keyevent@0__:del"
"""Channel of ``del`` events in db 0 (``notify-keyspace-events Eg``); UNLINK fires them too."""
STOP = b"invalgw-bench:stop"
"""Published on :data:`DEL_EVENTS` to tell a subscriber its run is over."""
CHUNK = 1000


def keys_of(prefix: str, index: int, per: int = 2) -> tuple[str, ...]:
    """The ``per`` cache keys invalidation ``index`` removes."""
    return tuple(f"{prefix}:{per * index + n}" for n in range(per))


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


def xadd_commands(
    stream: str, prefix: str, count: int, per: int = 2, *, partitions: int = 1
) -> list[bytes]:
    """Pre-encoded ``XADD <stream> * <contract fields>`` for invalidations 0 .. count-1; with
    ``partitions`` above 1, each to its partition's stream (the producers' rule)."""
    commands = []
    for index in range(count):
        keys = keys_of(prefix, index, per)
        fields = entry_fields(keys)
        args: list[str] = ["XADD", stream_for(stream, partitions, keys), "*"]
        for name, value in fields.items():
            args += [name, value]
        commands.append(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]
    return commands


def populate(port: int, prefix: str, keys: int, *, use_debug: bool) -> None:
    """Create the keys ``<prefix>:0`` .. ``<prefix>:<keys-1>`` (``DEBUG POPULATE``, else MSET)."""
    conn = RawConnection(port, timeout_s=120)
    try:
        if use_debug:
            conn.call("DEBUG", "POPULATE", keys, prefix, 8)
            return
        pending = 0
        for start in range(0, keys, CHUNK):
            args: list[str] = ["MSET"]
            for n in range(start, min(start + CHUNK, keys)):
                args += [f"{prefix}:{n}", "value"]
            conn.send(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]
            pending += 1
            if pending == 100:
                conn.replies(pending)
                pending = 0
        conn.replies(pending)
    finally:
        conn.close()


def produce_together(loads: Mapping[int, Sequence[bytes]]) -> tuple[float, float]:
    """Send each port's commands as fast as it can, all ports at once (one thread and connection
    each, released together once all are connected); the first start and the last end."""
    connections = {port: RawConnection(port) for port in loads}
    go = threading.Barrier(len(loads) + 1)
    times: list[tuple[float, float]] = []
    failures: list[BaseException] = []

    def send(port: int) -> None:
        conn, commands = connections[port], loads[port]
        chunks = [b"".join(commands[i : i + CHUNK]) for i in range(0, len(commands), CHUNK)]
        sizes = [min(CHUNK, len(commands) - i) for i in range(0, len(commands), CHUNK)]
        go.wait()
        try:
            start = time.monotonic()
            in_flight: list[int] = []
            for chunk, size in zip(chunks, sizes, strict=True):
                conn.send(chunk)
                in_flight.append(size)
                if len(in_flight) == 2:
                    conn.replies(in_flight.pop(0))
            for size in in_flight:
                conn.replies(size)
            times.append((start, time.monotonic()))
        except BaseException as exc:  # reported by the caller's thread
            failures.append(exc)

    threads = [threading.Thread(target=send, args=(port,), daemon=True) for port in loads]
    try:
        for thread in threads:
            thread.start()
        go.wait()
        for thread in threads:
            thread.join()
    finally:
        for conn in connections.values():
            conn.close()
    if failures:
        raise failures[0]
    return min(start for start, _ in times), max(end for _, end in times)


def schedule(start: float, rate: float, count: int) -> list[float]:
    """When each of ``count`` entries paced at ``rate`` per second is due: ``start + i / rate``."""
    return [start + index / rate for index in range(count)]


def pace(
    send: Callable[[int, int], None],
    count: int,
    rate: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[float], float, float]:
    """Call ``send(first, end)`` for entries ``first`` .. ``end-1`` as they fall due at ``rate``
    per second; returns every entry's *scheduled* send time, the run's length, and how late the
    producer was at worst (seconds from an entry falling due to its write starting).

    Whenever the producer gets to run, everything due by then goes out in one ``send``. If it
    falls behind (a stall, a slow reply), the late entries still carry their scheduled times, so
    the delay shows in the latency measured from them instead of vanishing from it.
    """
    start = clock()
    sent, late = 0, 0.0
    while sent < count:
        now, due = clock(), sent
        while due < count and start + due / rate <= now:  # the same sum as the pause below
            due += 1
        if due > sent:
            late = max(late, now - (start + sent / rate))
            send(sent, due)
            sent = due
        pause = start + sent / rate - clock()
        if pause > 0:
            sleep(max(pause, 0.0005))
    return schedule(start, rate, count), clock() - start, late


def produce_paced(
    port: int, commands: Sequence[bytes], rate: float
) -> tuple[list[float], float, float]:
    """Send ``commands`` at ``rate`` per second (:func:`pace`); their scheduled send times, the
    run's length, and the producer's worst lateness."""
    conn = RawConnection(port)

    def send(first: int, end: int) -> None:
        conn.send(b"".join(commands[first:end]))
        conn.replies(end - first)

    try:
        return pace(send, len(commands), rate)
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


def left_invalidations(client: redis.Redis, prefix: str, per: int) -> int:
    """How many invalidations still have a ``<prefix>:*`` key left (SCAN; never timed)."""
    skip = len(prefix) + 1
    return len(
        {int(key[skip:]) // per for key in client.scan_iter(match=f"{prefix}:*", count=10_000)}
    )


def subscribe(port: int, prefix: str, out: Path, per: int = 2) -> int:
    """Record when each invalidation's keys were deleted, until :data:`STOP` is published.

    Writes ``{invalidation index: monotonic time its last key went}`` as MessagePack.
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
                index = int(key[skip:]) // per
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
    sub.add_argument("--keys", type=int, default=2, help="keys per invalidation")
    args = parser.parse_args(argv)
    return subscribe(args.port, args.prefix, args.out, args.keys)


if __name__ == "__main__":
    raise SystemExit(main())
