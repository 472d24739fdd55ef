"""Redis clients with explicit timeouts and bounded, jittered retries.

redis-py's defaults can block a call for minutes during a network partition; every client the
gateway makes goes through here, so none of them runs with defaults.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from operator import itemgetter
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import hiredis
import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from invalgw.config import RedisEndpoint, redact
from invalgw.errors import RedisUnreachable
from invalgw.proto import StreamFields

log = logging.getLogger(__name__)

T = TypeVar("T")

AsyncRedis = redis.asyncio.Redis
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
"""Errors that mean "this Redis is not reachable right now"."""
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
"""Errors a pipeline stage survives: it backs off, rewinds and tries again; never fatal.
(redis-py's cluster client raises ``RedisClusterException``, which is not a ``RedisError``,
when the cluster does not cover every slot: a primary died and no replica took over.)"""


class _HiredisPacking:
    """Encodes commands with hiredis (C) instead of redis-py's asyncio encoder (Python).

    redis-py's blocking client already does this; its asyncio client encodes every argument in
    Python, which was a fifth of the gateway's CPU: an XACK of a batch has 500 IDs, an UNLINK
    1000 keys. The bytes sent are the same. Arguments hiredis does not take (bool, None,
    bytearray) go to redis-py's encoder, which raises its usual errors.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str | bytes) and (
            " " in name if isinstance(name, str) else b" " in name
        ):
            args = (*name.split(), *args[1:])  # "CONFIG GET" is two arguments
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
            return packed

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """redis-py's, without a task per command: it writes inside ``asyncio.wait_for`` (a new
        task, a timer) whenever a socket timeout is set, though a write that the socket took
        whole cannot block. Here the wait, with the same timeout and the same errors, is only
        for a write that left bytes in the transport's buffer."""
        connection: Any = self
        if not connection.is_connected or not connection.socket_timeout or isinstance(command, str):
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        if check_health:
            await connection.check_health()
        writer = connection._writer
        try:
            writer.writelines([command] if isinstance(command, bytes) else command)
            if writer.transport.get_write_buffer_size():
                await asyncio.wait_for(writer.drain(), connection.socket_timeout)
            else:
                await writer.drain()  # never waits: raises only if the connection was lost
        except TimeoutError:
            await connection.disconnect(nowait=True)
            raise redis.TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await connection.disconnect(nowait=True)
            raise redis.ConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            await connection.disconnect(nowait=True)  # part of a command may have gone
            raise


class _Connection(_HiredisPacking, redis.asyncio.Connection):
    pass


class _SSLConnection(_HiredisPacking, redis.asyncio.SSLConnection):
    pass


class _UnixConnection(_HiredisPacking, redis.asyncio.UnixDomainSocketConnection):
    pass


_HIREDIS_PACKING: dict[type[Any], type[Any]] = {
    redis.asyncio.Connection: _Connection,
    redis.asyncio.SSLConnection: _SSLConnection,
    redis.asyncio.UnixDomainSocketConnection: _UnixConnection,
}


def _backoff(endpoint: RedisEndpoint) -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(
        cap=endpoint.backoff_cap_ms / 1000, base=endpoint.backoff_base_ms / 1000
    )


class Connector(Protocol):
    """Makes the gateway's clients (tests pass one that wraps them)."""

    def __call__(self, endpoint: RedisEndpoint, *, name: str) -> AsyncRedis: ...


def _options(endpoint: RedisEndpoint, name: str) -> dict[str, Any]:
    """What every client sets explicitly; ``name`` shows in CLIENT LIST."""
    options: dict[str, Any] = {
        "socket_timeout": endpoint.socket_timeout_ms / 1000,
        "socket_connect_timeout": endpoint.connect_timeout_ms / 1000,
        "client_name": name,
        "decode_responses": False,
    }
    if not endpoint.url.startswith("unix:"):  # a unix:// connection refuses TCP options
        options["socket_keepalive"] = True
    return options


def _stream_entries(entries: list[Any] | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Entries of an XREADGROUP reply; an entry that repeats a field name keeps all of it in
    :class:`StreamFields` (a plain dict would keep the last value silently)."""
    if not entries:
        return []
    pairs = list(map(_second, entries))
    if None not in pairs and [] not in pairs:  # the usual batch: made at C speed
        fields = list(map(dict, map(zip, map(_names, pairs), map(_values, pairs))))
        if 2 * sum(map(len, fields)) == sum(map(len, pairs)):  # no entry repeats a name
            return list(zip(map(_first, entries), fields, strict=True))
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    for entry_id, entry_pairs in entries:
        if not entry_pairs:
            out.append((entry_id, {}))
            continue
        it = iter(entry_pairs)
        one = dict(zip(it, it, strict=False))
        out.append(
            (entry_id, one if 2 * len(one) == len(entry_pairs) else StreamFields(entry_pairs))
        )
    return out


_first, _second = itemgetter(0), itemgetter(1)
_names, _values = itemgetter(slice(0, None, 2)), itemgetter(slice(1, None, 2))


def _xreadgroup_reply(response: Any, **_options: Any) -> Any:
    """``[[stream, entries]]``, as redis-py returns it, from a RESP2 or RESP3 reply."""
    if not response:
        return []
    pairs = response.items() if isinstance(response, dict) else response
    return [[stream, _stream_entries(entries)] for stream, entries in pairs]


def _xrange_reply(response: Any, **_options: Any) -> Any:
    """The entries of an XRANGE reply, as :func:`_stream_entries` reads them: a sender that reads
    the stream itself must see a repeated field as the local apply does (and refuse the entry)."""
    return _stream_entries(response)


class Lane:
    """A connection of ``client``'s pool that one task keeps for the round trips it makes one
    after another (a stage's reads and acknowledgements).

    Taking a connection from the pool and giving it back (a lock, the pool's events and
    observability hooks, a check of the socket) cost a third of a short round trip's CPU. A lane
    takes one once; after an exchange failed or was interrupted the connection is disconnected
    (its reply may still come) and the next call connects it again. Never shared between tasks
    that run at once; :meth:`close` gives it back when the task ends."""

    def __init__(self, client: AsyncRedis) -> None:
        self.client = client
        self._connection: Any = None

    async def connection(self) -> Any:
        connection = self._connection
        if connection is None:
            connection = self._connection = await _take(self.client, None)
        elif not connection.is_connected:
            await connection.connect()
        return connection

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with anyio.CancelScope(shield=True):
                await self.client.connection_pool.release(connection)


async def _take(client: AsyncRedis, lane: Lane | None) -> Any:
    if lane is not None:
        return await lane.connection()
    return await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]


async def _give_back(client: AsyncRedis, lane: Lane | None, connection: Any) -> None:
    if lane is None:
        await client.connection_pool.release(connection)


async def call(client: AsyncRedis, *command: Any, lane: Lane | None = None) -> Any:
    """One command on a connection of ``client``'s pool (or ``lane``'s), its raw reply (no reply
    callback).

    Without redis-py's per-command machinery (a retry wrapper, a reply callback, the pool's
    events, a task and a timer per write), which cost more CPU than the round trip itself for
    the reads and the acknowledgement of each batch. Never retried here: a caller that must not
    repeat a write on its own gets the error. A connection that failed or was interrupted with
    its reply unread is disconnected, never reused as it is."""
    connection = await _take(client, lane)
    try:
        await connection.send_packed_command(connection.pack_command(*command), check_health=False)
        return await connection.read_response()
    except redis.ResponseError:
        raise  # a whole reply: the connection is fine
    except BaseException:
        await connection.disconnect(nowait=True)  # its reply may still come: never reuse it
        raise
    finally:
        await _give_back(client, lane, connection)


async def read_group(
    client: AsyncRedis,
    group: str,
    consumer: str,
    stream: str,
    cursor: bytes | str,
    *,
    count: int,
    block_ms: int | None,
    lane: Lane | None = None,
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """``XREADGROUP`` of one stream through :func:`call`: its entries, as the client's reply
    callback gives them."""
    blocking = () if block_ms is None else ("BLOCK", block_ms)
    reply = await call(
        client, "XREADGROUP", "GROUP", group, consumer, "COUNT", count, *blocking,
        "STREAMS", stream, cursor, lane=lane,
    )  # fmt: skip
    streams = _xreadgroup_reply(reply)
    entries: list[tuple[bytes, dict[bytes, bytes]]] = streams[0][1] if streams else []
    return entries


async def transaction(
    client: AsyncRedis,
    commands: Sequence[tuple[Any, ...]],
    *,
    raise_on_error: bool = True,
    lane: Lane | None = None,
) -> list[Any]:
    """``commands`` in one MULTI … EXEC, written at once on a connection of ``client``'s pool:
    the replies EXEC gives, raising the first error among them, as redis-py's transaction does
    (``raise_on_error=False``: an error reply stays in its place, as a ``ResponseError``).

    Without redis-py's pipeline machinery (a retry wrapper, a reply callback per command, the
    pool's events), which cost more CPU than the round trip itself for the acknowledgement of
    each batch. Never retried here: a caller that must not repeat a write on its own (a
    group's acknowledgement) gets the error. A connection that failed or was interrupted with
    replies unread is disconnected, never reused as it is.
    """
    connection = await _take(client, lane)
    try:
        packed = [*connection.pack_command("MULTI")]
        for command in commands:
            packed += connection.pack_command(*command)
        packed += connection.pack_command("EXEC")
        await connection.send_packed_command(packed, check_health=False)
        try:  # one deadline for every reply, not a timer armed and cancelled for each
            async with asyncio.timeout(connection.socket_timeout):
                for _ in range(len(commands) + 1):  # OK, then QUEUED for each (or the error)
                    await connection.read_response(timeout=math.inf)
                replies: list[Any] = await connection.read_response(timeout=math.inf)
        except TimeoutError:
            raise redis.TimeoutError("Timeout reading a transaction's replies") from None
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    finally:
        await _give_back(client, lane, connection)
    for reply in replies if raise_on_error else ():
        if isinstance(reply, redis.ResponseError):
            raise reply
    return replies


def connect(endpoint: RedisEndpoint, *, name: str) -> AsyncRedis:
    """An asyncio client for ``endpoint`` (``name``: ``invalgw:us-east:local``)."""
    client: AsyncRedis = redis.asyncio.Redis.from_url(
        endpoint.url,
        retry=AsyncRetry(_backoff(endpoint), endpoint.retries),
        **_options(endpoint, name),
    )
    client.set_response_callback("XREADGROUP", _xreadgroup_reply)
    client.set_response_callback("XRANGE", _xrange_reply)
    pool = client.connection_pool  # no connection is made before the first command
    pool.connection_class = _HIREDIS_PACKING.get(pool.connection_class, pool.connection_class)
    return client


def connect_cache(endpoint: RedisEndpoint, *, name: str) -> AsyncRedis | RedisCluster:
    """A client for a region's cache (or any endpoint): a cluster client when the endpoint is a
    Redis Cluster."""
    if not endpoint.cluster:
        return connect(endpoint, name=name)
    cluster: RedisCluster = RedisCluster.from_url(
        endpoint.url,
        retry=AsyncRetry(_backoff(endpoint), endpoint.retries),
        **_options(endpoint, name),
    )
    return cluster


async def cluster_nodes(
    endpoint: RedisEndpoint, keys: list[str], known: list[str] | None = None
) -> dict[str, str]:
    """The URL of the primary serving each of ``keys`` in the Redis Cluster at ``endpoint``
    (the endpoint's URL with that node's host and port), read from the cluster, entering it at
    the endpoint or, if that node does not answer, at one of the ``known`` node URLs."""
    startup = [
        ClusterNode(str(parts.hostname), parts.port)
        for parts in map(urlsplit, known or ())
        if parts.hostname and parts.port
    ]
    cluster: RedisCluster = RedisCluster.from_url(
        endpoint.url,
        startup_nodes=startup or None,
        retry=AsyncRetry(_backoff(endpoint), endpoint.retries),
        **_options(endpoint, "invalgw:nodes"),
    )
    try:
        await cluster.initialize()
        parts = urlsplit(endpoint.url)
        userinfo = parts.netloc.rpartition("@")[0]
        found = {}
        for key in keys:
            node = cluster.get_node_from_key(key)
            if node is None:
                raise redis.exceptions.ClusterDownError(f"no node serves the slot of {key!r}")
            netloc = (
                f"{userinfo}@{node.host}:{node.port}" if userinfo else f"{node.host}:{node.port}"
            )
            found[key] = urlunsplit(parts._replace(netloc=netloc))
        return found
    finally:
        await close(cluster)


def connect_sync_any(endpoint: RedisEndpoint, *, name: str) -> redis.Redis | redis.RedisCluster:
    """:func:`connect_sync`, or a blocking cluster client when the endpoint is a Redis Cluster."""
    if not endpoint.cluster:
        return connect_sync(endpoint, name=name)
    cluster: redis.RedisCluster = redis.RedisCluster.from_url(
        endpoint.url, retry=Retry(_backoff(endpoint), endpoint.retries), **_options(endpoint, name)
    )
    return cluster


def connect_sync(endpoint: RedisEndpoint, *, name: str) -> redis.Redis:
    """A blocking client for ``endpoint``, for the CLI and the synchronous producer helper."""
    client: redis.Redis = redis.Redis.from_url(
        endpoint.url, retry=Retry(_backoff(endpoint), endpoint.retries), **_options(endpoint, name)
    )
    return client


class CountingRetry(AsyncRetry):
    """redis-py's retry, telling ``on_error`` of every connection error or timeout it sees,
    and ``on_retry`` of every call it makes again, so the errors it absorbs are counted too.

    (Its callbacks are plain functions: redis-py deep-copies a retry into every connection.)
    """

    def __init__(
        self,
        retry: AsyncRetry,
        on_error: Callable[[Exception], None],
        on_retry: Callable[[], None],
    ) -> None:
        super().__init__(retry._backoff, retry._retries, retry._supported_errors)
        self._on_error = on_error
        self._on_retry = on_retry

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        retries = self._retries

        async def counted(error: Exception, failures: int) -> Any:
            self._on_error(error)
            if retries < 0 or failures <= retries:
                self._on_retry()
            return await (fail(error, failures) if with_failure_count else fail(error))

        return await super().call_with_retry(do, counted, is_retryable, with_failure_count=True)


def count_errors(
    client: AsyncRedis | RedisCluster,
    on_error: Callable[[Exception], None],
    on_retry: Callable[[], None],
) -> None:
    """Count every connection error and retry of ``client`` (see :class:`CountingRetry`).

    Not for a cluster client, whose retries work per node."""
    if isinstance(client, RedisCluster):
        return
    retry = client.get_retry()
    if retry is not None and not isinstance(retry, CountingRetry):
        client.set_retry(CountingRetry(retry, on_error, on_retry))


async def probe(client: AsyncRedis, *, label: str, url: str) -> str:
    """PING and read the server version; raise :class:`RedisUnreachable` saying what failed."""
    try:
        await client.ping()
        info = await client.info("server")
    except redis.AuthenticationError as exc:
        raise RedisUnreachable(f"{label}: {redact(url)}: authentication failed: {exc}") from None
    except REDIS_ERRORS as exc:
        raise RedisUnreachable(f"{label}: {redact(url)}: {exc}") from None
    return str(info.get("redis_version", "?"))


async def close(client: AsyncRedis | RedisCluster) -> None:
    """Close ``client`` within 2 s; a close that times out (a busy or unreachable Redis) is not
    an error worth failing a shutdown for: the connections go with the process."""
    with anyio.move_on_after(2, shield=True):
        try:
            await client.aclose()
        except REDIS_ERRORS as exc:
            log.debug("closing a Redis client: %s", exc)
