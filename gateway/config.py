"""Region configuration: one TOML file per region, decoded into frozen msgspec structs.

Every problem in a file is reported on a line of its own, naming the file, the field path and
what is wrong, so an operator can fix them all in one pass.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import msgspec
import redis.connection

from invalgw.errors import ConfigError
from invalgw.policy import Policy
from invalgw.proto import MAX_PARTITIONS, Guard, Limits, partition_stream

RegionName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
"""Region names appear in key names and metric labels: lower-case letters, digits, '.', '_', '-'."""
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SCHEMES = ("redis", "rediss", "unix")
_OVERRIDES = {
    "socket_timeout": "socket_timeout_ms",
    "timeout": "socket_timeout_ms",
    "socket_connect_timeout": "connect_timeout_ms",
    "retry_on_timeout": "retries",
    "retry_on_error": "retries",
    "decode_responses": None,
    "protocol": None,
    "client_name": None,
}
"""URL query parameters that would override how the gateway sets up its clients (redis-py lets
the URL win over explicit arguments), and the field to use instead."""


class RedisEndpoint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to reach one Redis: URL (TLS with ``rediss://``, ``user:password@`` accepted)."""

    url: str
    socket_timeout_ms: int = 5000
    connect_timeout_ms: int = 2000
    retries: int = 2
    """Retries of one call after a connection error or timeout, with jittered backoff."""
    backoff_base_ms: int = 20
    backoff_cap_ms: int = 1000
    cluster: bool = False
    """True for a Redis Cluster. A cache: keys are grouped by hash slot, scans visit every
    primary. The region's stream Redis: producers and ``invalgw publish`` use a cluster client
    (with ``[streams] partitions`` above 1, so the partitions spread over the shards)."""

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(
                f"url: {redact(self.url)!r} must start with redis://, rediss:// or unix://"
            )
        for name in parse_qs(urlsplit(self.url).query):
            if name in _OVERRIDES:
                instead = _OVERRIDES[name]
                hint = f"set {instead} instead" if instead else "remove it"
                raise ValueError(
                    f"url: query parameter {name!r} would override the gateway's own setting; "
                    + hint
                )
        _refuse_unverified_tls(self.url)
        try:
            redis.connection.parse_url(self.url)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        for name in (
            "socket_timeout_ms",
            "connect_timeout_ms",
            "backoff_base_ms",
            "backoff_cap_ms",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive")
        if self.retries < 0:
            raise ValueError("retries: must be 0 or more")
        if self.backoff_cap_ms < self.backoff_base_ms:
            raise ValueError("backoff_cap_ms: must not be below backoff_base_ms")


_UNVERIFIED = ("none", "cert_none", "optional", "cert_optional")


def _refuse_unverified_tls(url: str) -> None:
    """TLS without checking the server's certificate protects nothing against someone on the
    path, who can then read every password and invalidation: refuse it, say what to do."""
    for value in parse_qs(urlsplit(url).query).get("ssl_cert_reqs", []):
        if value.lower() in _UNVERIFIED:
            raise ValueError(
                f"url: ssl_cert_reqs={value} turns off the check of the server's TLS certificate "
                "(anyone on the path could pose as this Redis); give ssl_ca_certs=<CA file> "
                "for a private CA instead"
            )


class Peer(RedisEndpoint, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A peer region: its name and its Redis, where this gateway writes the mirror stream."""

    name: RegionName
    partitions: int = 1
    """How many partitions the peer's stream has (its ``[streams] partitions``): one mirror
    stream per partition arrives here from it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions: must be between 1 and {MAX_PARTITIONS}")


class Streams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Names and sizes of the streams the gateway reads and writes."""

    local: str = "invalidations"
    """The stream producers XADD into, in this region's Redis."""
    namespace: str = "invalgw"
    """Prefix of every key the gateway itself creates (mirrors, dead letters, state)."""
    max_len: int = 1_000_000
    """Hard cap on the local stream. Beyond it the oldest entries go even if a peer has not
    received them; that peer records a gap and resyncs."""
    mirror_max_len: int = 100_000
    """Hard cap, in envelopes, on each mirror stream this region receives."""
    dead_letter_max_len: int = 100_000
    partitions: int = 1
    """How many streams the local stream is split into (see README, "Partitioned streams"):
    partition ``p`` is the stream ``{<local>:p}``; 1 keeps the single stream ``<local>``."""

    def __post_init__(self) -> None:
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions: must be between 1 and {MAX_PARTITIONS}")
        if self.partitions > 1 and ("{" in self.local or "}" in self.local):
            raise ValueError(
                "local: a partitioned stream's name must not hold '{' or '}' (each partition "
                "gets a hash tag of its own)"
            )
        for name in ("max_len", "mirror_max_len", "dead_letter_max_len"):
            if getattr(self, name) < 1000:
                raise ValueError(f"{name}: must be at least 1000")
        for name in ("local", "namespace"):
            if not getattr(self, name):
                raise ValueError(f"{name}: must not be empty")


class Tuning(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the gateway reads, batches, reclaims and drains."""

    consumer: str = ""
    """Consumer name in every group; keep it stable per deployment slot. Default: the host name."""
    batch_size: int = 500
    block_ms: int = 1000
    """How long one XREADGROUP waits for entries; must stay below the socket timeout."""
    linger_ms: int = 1
    """After a small batch from the local stream, wait this long before reading again (0: never)."""
    heartbeat_interval_ms: int = 1000
    claim_idle_ms: int = 60_000
    """Pending entries idle this long (their consumer died) are reclaimed with XAUTOCLAIM."""
    claim_interval_ms: int = 15_000
    trim_interval_ms: int = 1000
    retry_backoff_cap_ms: int = 5000
    """Upper bound of the jittered wait between attempts to reach a Redis that is down."""
    drain_timeout_ms: int = 10_000
    """How long the first SIGTERM waits for batches in hand before exiting anyway."""
    lease_ms: int = 10_000
    """TTL of the region lease: a standby takes over this long after the holder died."""
    feed_batches: int = 64
    """Batches queued in memory for one peer's sender; beyond, it reads the stream itself."""
    window_batches: int = 16
    """Envelopes sent to one peer and not yet answered, at most (pipelined on one connection)."""

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 10_000:
            raise ValueError("batch_size: must be between 1 and 10000")
        if not 1 <= self.feed_batches <= 10_000:
            raise ValueError("feed_batches: must be between 1 and 10000")
        if not 0 <= self.linger_ms <= 100:
            raise ValueError("linger_ms: must be between 0 and 100")
        if not 1 <= self.window_batches <= 1000:
            raise ValueError("window_batches: must be between 1 and 1000")
        for name in (
            "block_ms",
            "heartbeat_interval_ms",
            "claim_idle_ms",
            "claim_interval_ms",
            "trim_interval_ms",
            "retry_backoff_cap_ms",
            "drain_timeout_ms",
            "lease_ms",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive")


class Metrics(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Prometheus endpoint: ``port = 0`` turns it off."""

    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port: must be between 0 and 65535")


class CacheEndpoint(RedisEndpoint, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The region's cache, when it is not the same Redis as ``[redis]``."""


class RegionConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything one region's gateway needs to know."""

    region: RegionName
    redis: RedisEndpoint
    """The region's Redis: its invalidation stream, mirrors and state."""
    cache: CacheEndpoint | None = None
    """The region's cache, where keys are unlinked. Default: the same Redis as ``redis``."""
    peers: list[Peer] = []
    streams: Streams = Streams()
    gateway: Tuning = Tuning()
    limits: Limits = Limits()
    metrics: Metrics = Metrics()
    policy: Policy = Policy()

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for i, peer in enumerate(self.peers):
            if peer.name == self.region:
                raise ValueError(
                    f"peers[{i}].name: {peer.name!r} is this region; a region is not its own peer"
                )
            if peer.name in seen:
                raise ValueError(
                    f"peers[{i}].name: {peer.name!r} is already listed as peers[{seen[peer.name]}]"
                )
            seen[peer.name] = i
        if self.redis.cluster and self.streams.partitions == 1:
            raise ValueError(
                "redis.cluster: a stream Redis that is a Redis Cluster needs [streams] "
                "partitions above 1 (the keys of one partition share a slot; those of the "
                "unpartitioned stream do not)"
            )
        if self.gateway.block_ms >= self.redis.socket_timeout_ms:
            raise ValueError(
                f"gateway.block_ms: {self.gateway.block_ms} must be below "
                f"redis.socket_timeout_ms ({self.redis.socket_timeout_ms}), or every idle read "
                "would time out"
            )

    @property
    def guard(self) -> Guard:
        """The region's limits, plus the names no producer or peer may invalidate: the
        namespace and the local stream (every partition of it)."""
        return Guard(
            **msgspec.structs.asdict(self.limits),
            namespace=self.streams.namespace,
            names=tuple(self.local_streams),
        )

    @property
    def local_streams(self) -> list[str]:
        """The local stream, or each of its partitions."""
        streams = self.streams
        return [
            partition_stream(streams.local, p, streams.partitions)
            for p in range(streams.partitions)
        ]

    @property
    def cache_endpoint(self) -> CacheEndpoint:
        return self.cache or CacheEndpoint(**msgspec.structs.asdict(self.redis))

    @property
    def regions(self) -> list[str]:
        """Every region of the topology: this one and its peers."""
        return [self.region, *(peer.name for peer in self.peers)]

    @property
    def consumer(self) -> str:
        return self.gateway.consumer or socket.gethostname()


def load_config(path: str | os.PathLike[str]) -> RegionConfig:
    """Read and validate one region file; raise :class:`ConfigError` listing every problem."""
    name = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(name, ["file not found"]) from None
    except OSError as exc:
        raise ConfigError(name, [f"cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            name,
            [f"cannot read: not UTF-8 text (byte {exc.object[exc.start]:#04x} at {exc.start})"],
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, [f"not valid TOML: {exc}"]) from None
    return parse_config(raw, name)


def parse_config(raw: dict[str, Any], name: str = "<config>") -> RegionConfig:
    """Validate an already-parsed TOML document (see :func:`load_config`)."""
    problems: list[str] = []
    raw = _expand_env(raw, "", problems)
    if not problems:
        problems = _problems(raw, RegionConfig, "")
    if problems:
        raise ConfigError(name, problems)
    try:
        return msgspec.convert(raw, RegionConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(name, [_describe(exc, "")]) from None


def _expand_env(value: Any, path: str, problems: list[str]) -> Any:
    """Replace ``${NAME}`` in strings with the environment variable, e.g. for passwords."""
    if isinstance(value, dict):
        return {k: _expand_env(v, _join(path, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def lookup(match: re.Match[str]) -> str:
            if match.group(1) not in os.environ:
                problems.append(f"{path}: environment variable {match.group(1)} is not set")
                return ""
            return os.environ[match.group(1)]

        return _ENV_REF.sub(lookup, value)
    return value


def _problems(value: Any, struct: type[msgspec.Struct], path: str) -> list[str]:
    """Every problem in ``value`` as ``struct``: unknown, missing and mistyped fields first; then,
    if there are none, the struct's own cross-field checks (its ``__post_init__``)."""
    if not isinstance(value, dict):
        return [f"{path or 'file'}: expected a table, got {_kind(value)}"]
    problems: list[str] = []
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    for key in value:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(f"{_join(path, key)}: unknown field (known fields: {known})")
    for key, field in fields.items():
        if key in value:
            problems += _field_problems(value[key], field.type, _join(path, key))
        elif field.required:
            problems.append(f"{_join(path, key)}: required field is missing")
    if not problems:
        try:
            msgspec.convert(value, struct)
        except msgspec.ValidationError as exc:
            problems.append(_describe(exc, path))
    return problems


def _field_problems(value: Any, annotation: Any, where: str) -> list[str]:
    nested = _struct_of(annotation)
    if nested is not None and _is_list(annotation) and isinstance(value, list):
        return [
            problem
            for i, item in enumerate(value)
            for problem in _problems(item, nested, f"{where}[{i}]")
        ]
    if nested is not None and isinstance(value, dict):
        return _problems(value, nested, where)
    try:
        msgspec.convert(value, annotation)
    except msgspec.ValidationError as exc:
        return [_describe(exc, where)]
    return []


def _struct_of(annotation: Any) -> type[msgspec.Struct] | None:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
    return None


def _is_list(annotation: Any) -> bool:
    return getattr(annotation, "__origin__", None) is list


_TOML_KINDS = {
    "int": "an integer",
    "float": "a number with a fraction",
    "str": "a string",
    "bool": "a boolean",
    "object": "a table",
    "array": "an array",
    "null": "nothing",
}
_EXPECTED = re.compile(r"Expected `([^`]+)`, got `([^`]+)`")


def _plain_types(match: re.Match[str]) -> str:
    expected, got = match.group(1), match.group(2)
    if expected == "array" and got == "object":
        return "expected an array of tables ([[...]]), got a table"
    expected = " or ".join(_TOML_KINDS.get(kind, kind) for kind in expected.split(" | "))
    return f"expected {expected}, got {_TOML_KINDS.get(got, got)}"


def _describe(exc: msgspec.ValidationError, path: str) -> str:
    message = str(exc)
    where = path
    if " - at `$" in message:
        message, _, rest = message.rpartition(" - at `$")
        where = (path + rest.rstrip("`")).lstrip(".")
    message = _EXPECTED.sub(_plain_types, message)
    if message.startswith("Expected `str` matching regex"):
        message = "must be lower-case letters, digits, '.', '_' or '-' (at most 63)"
    field, sep, problem = message.partition(": ")
    if sep and re.fullmatch(r"[a-z_.\[\]0-9]+", field):
        where, message = _join(where, field), problem
    return f"{where or 'file'}: {message}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", int: "an integer", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def to_toml(config: RegionConfig) -> str:
    """``config`` as a region file that :func:`load_config` reads back to an equal config.

    Every field is written, defaults included. Secrets expanded from ``${VAR}`` are written as
    they are, so keep the output somewhere private.
    """
    raw: dict[str, Any] = msgspec.to_builtins(config)
    return "\n".join(_toml_table(raw, "")).strip() + "\n"


def _toml_table(table: dict[str, Any], prefix: str) -> list[str]:
    lines = [
        f"{key} = {_toml_value(value)}"
        for key, value in table.items()
        if value is not None and not _is_table(value) and not _is_table_array(value)
    ]
    for key, value in table.items():
        if _is_table(value):
            lines += ["", f"[{prefix}{key}]", *_toml_table(value, f"{prefix}{key}.")]
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{prefix}{key}]]", *_toml_table(item, f"{prefix}{key}.")]
    return lines


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
