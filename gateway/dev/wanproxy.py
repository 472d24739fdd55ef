"""A loopback WAN for rehearsing partitions: a TCP proxy that delays, blackholes, resets, refuses.

Point a gateway's peer URL at the proxy instead of the peer's Redis, then change what the link
does while everything runs (from a test, or with ``invalgw wan-proxy-ctl`` against ``--control``):

- ``set_delay(ms, jitter_ms)``: one-way delay (± jitter) per direction, applied to each chunk as it
  is read; bytes keep their order, so a round trip gains twice the delay;
- ``blackhole()``: connections are accepted and kept, but nothing is forwarded either way, as when
  packets vanish: calls time out. Bytes already read are held and flow on ``heal()``, as TCP would
  retransmit them, so a call that timed out may still take effect late (like on a real WAN);
- ``reset_connections()``: every current connection is closed with a TCP RST: calls fail at once;
- ``refuse()``: the listening socket is closed, so new connections are refused (current ones stay);
- ``heal()``: forward and accept again. The delay stays; ``set_delay(0)`` removes it.

Each connection holds at most :data:`QUEUE_CHUNKS` + 2 chunks of :data:`CHUNK_BYTES` per
direction (the queue, the chunk the writer holds and the one the reader waits to queue); beyond
that it stops reading, so a slow or blackholed side pushes back on the sender through TCP
instead of filling the proxy's memory. Nothing is buffered elsewhere in the proxy: it writes to
raw non-blocking sockets, so what it wrote is in the kernel when a connection closes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from invalgw.cliargs import bind
from invalgw.errors import GatewayError

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
QUEUE_CHUNKS = 8
"""Chunks held per direction of a connection: at most ~0.5 MiB (plus one chunk in each hand)."""
REBIND_RETRY_S = 0.2

Direction = Literal["upstream", "downstream"]
"""``upstream``: from the proxy's clients to the target; ``downstream``: the replies."""
DIRECTIONS: tuple[Direction, ...] = ("upstream", "downstream")
_DIRECTION_WORDS: dict[str, Direction | None] = {
    "upstream": "upstream",
    "downstream": "downstream",
    "both": None,
}


@dataclass
class Shape:
    """What one direction of the link adds to each chunk: a delay, ± a uniform jitter."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0

    def draw_s(self) -> float:
        jitter = random.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        return max(0.0, self.delay_ms + jitter) / 1000


@dataclass(eq=False)
class _Connection:
    client: socket.socket
    upstream: socket.socket | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    buffered: int = 0
    """Bytes read from one side and not yet written to the other."""
    rst: bool = False

    def reset(self) -> None:
        """Stop forwarding and close both sides with a TCP RST."""
        self.rst = True
        self.scope.cancel()

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            if sock is not None:
                _close(sock, rst=self.rst)


class WanProxy:
    """Forwards TCP connections from ``listen_host:listen_port`` to ``target_host:target_port``.

    ``listen_port=0`` picks a free port (see :attr:`port` after :meth:`listen`). Run it with
    ``await task_group.start(proxy.serve)``; cancelling ``serve`` closes every connection.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 512,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = listen_port
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self.shapes: dict[Direction, Shape] = {d: Shape() for d in DIRECTIONS}
        self.set_delay(delay_ms, jitter_ms)
        self.blackholed = False
        self.refusing = False
        self.forwarded: dict[Direction, int] = dict.fromkeys(DIRECTIONS, 0)
        """Bytes forwarded so far, per direction."""
        self._connections: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._accept_scope: anyio.CancelScope | None = None
        self._changed: anyio.Event | None = None
        """Set and replaced on every change of state, while serving."""

    # -- what a test or the control port changes at runtime ----------------------------------

    def set_delay(
        self, ms: float, jitter_ms: float = 0.0, *, direction: Direction | None = None
    ) -> None:
        """One-way delay of each chunk (``None``: both directions), ± a uniform jitter."""
        if ms < 0 or jitter_ms < 0:
            raise ValueError("delay and jitter must not be negative")
        for each in DIRECTIONS if direction is None else (direction,):
            self.shapes[each] = Shape(ms, jitter_ms)
        log.info("delay %s ms ± %s ms (%s)", ms, jitter_ms, direction or "both directions")

    def blackhole(self) -> None:
        """Forward nothing in either direction; connections stay open and calls time out."""
        log.info("blackhole: forwarding nothing to or from %s", self.target)
        self.blackholed = True
        self._notify()

    def reset_connections(self) -> int:
        """Close every current connection with a TCP RST; returns how many there were."""
        connections = list(self._connections)
        for connection in connections:
            connection.reset()
        log.info("reset %d connections to %s", len(connections), self.target)
        return len(connections)

    def refuse(self) -> None:
        """Close the listening socket: new connections are refused until :meth:`heal`."""
        log.info("refusing new connections on port %d", self.port)
        self.refusing = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        self._notify()

    def heal(self) -> None:
        """Forward and accept again (held bytes flow now); the delay is kept."""
        log.info("healed: forwarding to %s again", self.target)
        if self.refusing and self._listener is None and self._changed is not None:
            with contextlib.suppress(OSError):  # else serve() keeps trying
                self.listen()
        self.blackholed = False
        self.refusing = False
        self._notify()

    @property
    def target(self) -> str:
        return f"{self.target_host}:{self.target_port}"

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def buffered_bytes(self) -> int:
        """Bytes the proxy holds (read, not yet written), over all connections."""
        return sum(connection.buffered for connection in self._connections)

    def status(self) -> str:
        state = [
            name for name, on in (("blackhole", self.blackholed), ("refusing", self.refusing)) if on
        ]
        up, down = self.shapes["upstream"], self.shapes["downstream"]
        return (
            f"state={'+'.join(state) or 'normal'} connections={self.connections} "
            f"delay_ms={up.delay_ms:g}/{down.delay_ms:g} "
            f"jitter_ms={up.jitter_ms:g}/{down.jitter_ms:g} "
            f"forwarded={self.forwarded['upstream']}/{self.forwarded['downstream']}"
        )

    def command(self, line: str) -> str:
        """Run one control command (see ``invalgw wan-proxy-ctl --help``); returns the reply."""
        verb, *args = line.split() or [""]
        actions: dict[str, Callable[[], object]] = {
            "blackhole": self.blackhole,
            "reset": self.reset_connections,
            "refuse": self.refuse,
            "heal": self.heal,
            "status": lambda: None,
        }
        try:
            if verb.lower() == "delay" and 1 <= len(args) <= 3:
                if len(args) == 3 and args[2] not in _DIRECTION_WORDS:
                    raise ValueError("direction must be upstream, downstream or both")
                jitter = float(args[1]) if len(args) > 1 else 0.0
                direction = _DIRECTION_WORDS[args[2] if len(args) == 3 else "both"]
                self.set_delay(float(args[0]), jitter, direction=direction)
            elif verb.lower() in actions and not args:
                actions[verb.lower()]()
            else:
                return f"error: unknown command {line.strip()!r}; commands: {CONTROL_COMMANDS}"
        except ValueError as exc:
            return f"error: {exc}"
        return f"ok {self.status()}"

    # -- serving ------------------------------------------------------------------------------

    def listen(self) -> None:
        """Bind the listening socket now (raises ``OSError`` if the address is taken)."""
        if self._listener is None:
            self._listener = _bind(self.listen_host, self.port)
            self.port = self._listener.getsockname()[1]

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept and forward connections until cancelled; reports ready once listening."""
        self.listen()
        self._changed = anyio.Event()
        slots = anyio.Semaphore(self.max_connections)
        log.info("forwarding %s:%d to %s", self.listen_host, self.port, self.target)
        try:
            async with anyio.create_task_group() as connections:
                task_status.started()
                while True:
                    if not self.refusing:
                        with anyio.CancelScope() as self._accept_scope:
                            await self._accept(connections, slots)
                        self._accept_scope = None
                    if self.refusing:
                        self._close_listener()
                        while self.refusing:
                            await self._wait_for_change()
                    await self._listen_again()
        finally:
            self._accept_scope = None
            self._changed = None
            self._close_listener()

    async def _accept(self, connections: anyio.abc.TaskGroup, slots: anyio.Semaphore) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            await slots.acquire()  # at the limit, new connections wait in the listen backlog
            try:
                sock = await _accept(listener)
            except BaseException:
                slots.release()
                raise
            if self.refusing:  # refuse() was called since; the listener closes at once
                _close(sock, rst=True)
                slots.release()
                continue
            connections.start_soon(self._forward_connection, sock, slots)

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _listen_again(self) -> None:
        while self._listener is None and not self.refusing:
            try:
                self.listen()
            except OSError as exc:
                log.warning("cannot listen on port %d again: %s; retrying", self.port, exc)
                await anyio.sleep(REBIND_RETRY_S)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = anyio.Event()

    async def _wait_for_change(self) -> None:
        assert self._changed is not None
        await self._changed.wait()

    async def _while_blackholed(self) -> None:
        while self.blackholed:
            await self._wait_for_change()

    async def _forward_connection(self, client: socket.socket, slots: anyio.Semaphore) -> None:
        connection = _Connection(client)
        self._connections.add(connection)
        try:
            with connection.scope:
                try:
                    upstream = connection.upstream = await self._connect()
                except OSError as exc:
                    log.info("cannot reach %s: %s; resetting the client", self.target, exc)
                    connection.rst = True
                    return
                async with anyio.create_task_group() as tg:
                    self._pipe(tg, connection, client, upstream, "upstream")
                    self._pipe(tg, connection, upstream, client, "downstream")
        finally:
            self._connections.discard(connection)
            connection.close()
            slots.release()

    def _pipe(
        self,
        tg: anyio.abc.TaskGroup,
        connection: _Connection,
        source: socket.socket,
        sink: socket.socket,
        direction: Direction,
    ) -> None:
        send, receive = anyio.create_memory_object_stream[tuple[float, bytes]](QUEUE_CHUNKS)
        tg.start_soon(self._read, connection, source, send, direction)
        tg.start_soon(self._write, connection, receive, sink, direction)

    async def _connect(self) -> socket.socket:
        with anyio.fail_after(self.connect_timeout_s):
            infos = await anyio.getaddrinfo(
                self.target_host, self.target_port, type=socket.SOCK_STREAM
            )
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    sock.connect(address)
                except BlockingIOError:
                    await anyio.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error))
            except BaseException:
                sock.close()
                raise
        return sock

    async def _read(
        self,
        connection: _Connection,
        source: socket.socket,
        queue: MemoryObjectSendStream[tuple[float, bytes]],
        direction: Direction,
    ) -> None:
        """Read chunks and stamp each with when it may leave; blocks while the queue is full."""
        async with queue:
            while True:
                try:
                    data = await _recv(source)
                except OSError:
                    connection.reset()
                    return
                connection.buffered += len(data)
                due = anyio.current_time() + self.shapes[direction].draw_s()
                try:
                    await queue.send((due, data))
                except anyio.BrokenResourceError:  # the writer stopped: the connection is closing
                    return
                if not data:  # end of stream: passed on once everything before it was written
                    return

    async def _write(
        self,
        connection: _Connection,
        queue: MemoryObjectReceiveStream[tuple[float, bytes]],
        sink: socket.socket,
        direction: Direction,
    ) -> None:
        """Write chunks in the order they were read, each no earlier than its stamp."""
        async with queue:
            async for due, data in queue:
                await self._while_blackholed()
                await anyio.sleep_until(due)
                await self._while_blackholed()
                try:
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    await _send_all(sink, data)
                except OSError:
                    connection.reset()
                    return
                connection.buffered -= len(data)
                self.forwarded[direction] += len(data)


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _accept(listener: socket.socket) -> socket.socket:
    while True:
        await anyio.lowlevel.checkpoint()
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            await anyio.wait_readable(listener)
            continue
        except OSError as exc:  # e.g. out of file descriptors: keep serving the others
            log.warning("accept failed: %s", exc)
            await anyio.sleep(REBIND_RETRY_S)
            continue
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


async def _recv(sock: socket.socket) -> bytes:
    while True:
        await anyio.lowlevel.checkpoint()
        try:
            return sock.recv(CHUNK_BYTES)
        except BlockingIOError:
            await anyio.wait_readable(sock)


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        view = view[sent:]


def _close(sock: socket.socket, *, rst: bool) -> None:
    if rst:  # linger 0: close() discards what is unsent and answers with RST
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- control port -------------------------------------------------------------------------------

CONTROL_COMMANDS = (
    "delay MS [JITTER_MS] [upstream|downstream|both], blackhole, reset, refuse, heal, status"
)


async def serve_control(
    proxy: WanProxy,
    host: str,
    port: int,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run commands (``blackhole``, ``heal``, …) sent to ``host:port``, one line per connection."""
    listener = _bind(host, port)
    try:
        task_status.started(listener.getsockname()[1])
        async with anyio.create_task_group() as tg:
            while True:
                tg.start_soon(_control_session, proxy, await _accept(listener))
    finally:
        listener.close()


async def _control_session(proxy: WanProxy, sock: socket.socket) -> None:
    """Read a line (or what arrives before EOF), run the command(s) in it, answer, close."""
    received = b""
    try:
        with anyio.move_on_after(10):
            while b"\n" not in received and len(received) <= 4096:
                data = await _recv(sock)
                if not data:
                    break
                received += data
            lines = [line.decode(errors="replace") for line in received.split(b"\n")]
            replies = [proxy.command(line) + "\n" for line in lines if line.strip()]
            await _send_all(sock, "".join(replies).encode())
    except OSError as exc:
        log.debug("control connection failed: %s", exc)
    finally:
        sock.close()


def send_command(address: tuple[str, int], command: str, *, timeout_s: float = 5.0) -> str:
    """Send one command to a proxy's control port and return its reply (the proxy then closes)."""
    with socket.create_connection(address, timeout=timeout_s) as sock:
        sock.sendall(command.encode() + b"\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    return reply.decode().strip()


# -- command line ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WanProxyOptions:
    listen: tuple[str, int]
    target: tuple[str, int]
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    control: tuple[str, int] | None = None
    connect_timeout_ms: float = 5000.0
    max_connections: int = 512


@dataclass(frozen=True)
class WanProxyCtlOptions:
    control: tuple[str, int]
    words: tuple[str, ...]


def add_parser(commands: Any) -> None:
    proxy = commands.add_parser(
        "wan-proxy",
        help="a TCP proxy that adds WAN delay and partitions between regions",
        description="Forward TCP connections (a peer region's Redis) with a one-way delay per "
        "direction, and blackhole, reset or refuse them on command (see --control). "
        "Runs until SIGTERM/SIGINT.",
    )
    proxy.add_argument(
        "--listen",
        required=True,
        type=address,
        metavar="HOST:PORT",
        help="where clients (a gateway) connect, e.g. 127.0.0.1:7001",
    )
    proxy.add_argument(
        "--target",
        required=True,
        type=address,
        metavar="HOST:PORT",
        help="where connections go on to (the peer region's Redis)",
    )
    proxy.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="one-way delay in milliseconds, each direction (default: 0)",
    )
    proxy.add_argument(
        "--jitter-ms",
        type=float,
        default=0.0,
        help="± uniform jitter per chunk, milliseconds (default: 0)",
    )
    proxy.add_argument(
        "--control",
        type=address,
        metavar="HOST:PORT",
        help="accept commands here, one line per connection (the reply closes it): "
        + CONTROL_COMMANDS,
    )
    proxy.add_argument(
        "--connect-timeout-ms",
        type=float,
        default=5000.0,
        help="give up connecting to --target after this many milliseconds; the client's "
        "connection is then closed (default: 5000)",
    )
    proxy.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="connections open at once; more are refused (default: 512)",
    )
    bind(proxy, cmd_wan_proxy, WanProxyOptions)

    control = commands.add_parser(
        "wan-proxy-ctl",
        help="tell a running wan-proxy to delay, blackhole, reset, refuse or heal",
        description=f"Commands: {CONTROL_COMMANDS}.",
    )
    control.add_argument(
        "--control",
        required=True,
        type=address,
        metavar="HOST:PORT",
        help="the running proxy's --control address",
    )
    control.add_argument(
        "words",
        nargs="+",
        metavar="COMMAND",
        help=f"the command and its arguments: {CONTROL_COMMANDS}",
    )
    bind(control, cmd_wan_proxy_ctl, WanProxyCtlOptions)


def address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``) as a tuple, for argparse."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def cmd_wan_proxy(options: WanProxyOptions) -> int:
    proxy = WanProxy(
        *options.target,
        listen_host=options.listen[0],
        listen_port=options.listen[1],
        delay_ms=options.delay_ms,
        jitter_ms=options.jitter_ms,
        connect_timeout_s=options.connect_timeout_ms / 1000,
        max_connections=options.max_connections,
    )
    try:
        proxy.listen()
    except OSError as exc:
        raise GatewayError(f"cannot listen on {_show(options.listen)}: {exc}") from None
    return anyio.run(_run_until_signal, proxy, options.control)


async def _run_until_signal(proxy: WanProxy, control: tuple[str, int] | None) -> int:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(proxy.serve)
            if control is not None:
                port = await tg.start(serve_control, proxy, *control)
                log.info("control commands on %s:%d", control[0], port)
            async for signum in signals:
                log.info("received %s: closing every connection", signal.Signals(signum).name)
                break
            tg.cancel_scope.cancel()
    return 0


def cmd_wan_proxy_ctl(options: WanProxyCtlOptions) -> int:
    try:
        reply = send_command(options.control, " ".join(options.words))
    except OSError as exc:
        raise GatewayError(
            f"no wan-proxy control port at {_show(options.control)}: {exc}"
        ) from None
    print(reply)
    return 0 if reply.startswith("ok") else 1


def _show(where: tuple[str, int]) -> str:
    return f"{where[0]}:{where[1]}"
