"""Region configuration as an operator meets it: defaults, every kind of mistake, the CLI.

A mistake must come back as one line naming the file, the field path and the problem; ``invalgw
check`` prints those lines, then proves every Redis the file names can be reached.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis
import redis.asyncio

from invalgw.cli import main
from invalgw.config import (
    Metrics,
    RedisEndpoint,
    RegionConfig,
    Streams,
    Tuning,
    load_config,
    parse_config,
    redact,
)
from invalgw.connections import connect, connect_sync
from invalgw.dev.localredis import free_port
from invalgw.errors import ConfigError
from invalgw.ops.peerfiles import given, partition_mismatches
from invalgw.proto import Limits, parse_entry
from tests.conftest import REGIONS, make_configs, write_config
from tests.processes import die_with_parent
from tests.servers import RedisServer

REPO = Path(__file__).parent.parent
MINIMAL = """\
region = "us-east"

[redis]
url = "redis://127.0.0.1:6379/0"
"""


def write(tmp_path: Path, text: str, name: str = "us-east.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- a valid file ---------------------------------------------------------------------------


def test_minimal_config_takes_every_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.region == "us-east"
    assert config.redis == RedisEndpoint(url="redis://127.0.0.1:6379/0")
    assert config.cache is None
    assert config.cache_endpoint.url == config.redis.url
    assert not config.cache_endpoint.cluster
    assert config.peers == []
    assert config.streams == Streams()
    assert config.gateway == Tuning()
    assert config.limits == Limits()
    assert config.metrics == Metrics()
    assert config.consumer == socket.gethostname()


def test_defaults_are_the_documented_ones() -> None:
    """The numbers operators plan with (docs/configuration.md); a change here is a release note."""
    endpoint = RedisEndpoint(url="redis://h")
    assert (endpoint.socket_timeout_ms, endpoint.connect_timeout_ms, endpoint.retries) == (
        5000,
        2000,
        2,
    )
    assert (Streams().local, Streams().namespace, Streams().max_len) == (
        "invalidations",
        "invalgw",
        1_000_000,
    )
    assert (Tuning().batch_size, Tuning().block_ms, Tuning().heartbeat_interval_ms) == (
        500,
        1000,
        1000,
    )
    assert (Metrics().host, Metrics().port) == ("127.0.0.1", 0)


def test_every_section_can_be_set(tmp_path: Path) -> None:
    text = """\
region = "eu-west"

[redis]
url = "rediss://gateway:pw@redis.eu-west.internal:6380/0"
socket_timeout_ms = 3000
connect_timeout_ms = 1500
retries = 1
backoff_base_ms = 10
backoff_cap_ms = 500

[cache]
url = "redis://cache.eu-west.internal:6379/2"

[streams]
local = "inval"
namespace = "gw"
max_len = 50000
mirror_max_len = 20000
dead_letter_max_len = 5000

[gateway]
consumer = "gw-0"
batch_size = 200
block_ms = 500
heartbeat_interval_ms = 2000
claim_idle_ms = 30000
claim_interval_ms = 10000
trim_interval_ms = 2000
retry_backoff_cap_ms = 3000
drain_timeout_ms = 20000

[limits]
max_keys = 100
max_key_bytes = 512
max_field_bytes = 32768

[metrics]
host = "0.0.0.0"
port = 9100

[[peers]]
name = "us-east"
url = "rediss://redis.us-east.internal:6380/0"
socket_timeout_ms = 4000
"""
    config = load_config(write(tmp_path, text))
    assert config.cache_endpoint.url == "redis://cache.eu-west.internal:6379/2"
    assert config.consumer == "gw-0"
    assert config.peers[0].name == "us-east"
    assert config.peers[0].socket_timeout_ms == 4000
    assert config.peers[0].retries == 2
    assert config.limits == Limits(max_keys=100, max_key_bytes=512, max_field_bytes=32768)


def test_env_references_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVALGW_TEST_PW", "s3cret")
    monkeypatch.setenv("INVALGW_TEST_HOST", "redis.eu-west.internal")
    text = """\
region = "us-east"

[redis]
url = "redis://gateway:${INVALGW_TEST_PW}@127.0.0.1:6379/0"

[[peers]]
name = "eu-west"
url = "rediss://gateway:${INVALGW_TEST_PW}@${INVALGW_TEST_HOST}:6380/0"
"""
    config = load_config(write(tmp_path, text))
    assert config.redis.url == "redis://gateway:s3cret@127.0.0.1:6379/0"
    assert config.peers[0].url == "rediss://gateway:s3cret@redis.eu-west.internal:6380/0"


def test_expanded_values_are_not_expanded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INVALGW_TEST_PW", "${HOME}")
    text = MINIMAL.replace("redis://", "redis://:${INVALGW_TEST_PW}@")
    assert load_config(write(tmp_path, text)).redis.url.startswith("redis://:${HOME}@")


# --- every kind of mistake: one line, naming file, field path and problem -----------------------

MISTAKES = [
    pytest.param(
        MINIMAL + "regoin = 1\n",
        "redis.regoin: unknown field (known fields: backoff_base_ms, backoff_cap_ms, ",
        id="unknown-field-in-table",
    ),
    pytest.param(
        'regoin = "us-east"\n' + MINIMAL,
        "regoin: unknown field (known fields: cache, gateway, limits, metrics, peers, policy, "
        "redis, region, streams)",
        id="unknown-top-level-field",
    ),
    pytest.param(
        MINIMAL + '[[peers]]\nname = "eu-west"\nurl = "redis://h"\ntimeout = 3\n',
        "peers[0].timeout: unknown field",
        id="unknown-field-in-peer",
    ),
    pytest.param(
        MINIMAL + "[gateway]\nbatchsize = 100\n", "gateway.batchsize: unknown field", id="typo"
    ),
    pytest.param(
        '[redis]\nurl = "redis://h"\n', "region: required field is missing", id="missing-region"
    ),
    pytest.param('region = "us-east"\n', "redis: required field is missing", id="missing-redis"),
    pytest.param(
        'region = "us-east"\n[redis]\nsocket_timeout_ms = 100\n',
        "redis.url: required field is missing",
        id="missing-url",
    ),
    pytest.param(
        MINIMAL + '[[peers]]\nurl = "redis://h"\n',
        "peers[0].name: required field is missing",
        id="missing-peer-name",
    ),
    pytest.param(
        MINIMAL + '[gateway]\nbatch_size = "500"\n',
        "gateway.batch_size: expected an integer, got a string",
        id="string-for-integer",
    ),
    pytest.param(
        MINIMAL + "[gateway]\nbatch_size = 1.5\n",
        "gateway.batch_size: expected an integer, got a number with a fraction",
        id="float-for-integer",
    ),
    pytest.param(
        MINIMAL + "[gateway]\nbatch_size = true\n",
        "gateway.batch_size: expected an integer, got a boolean",
        id="bool-for-integer",
    ),
    pytest.param(
        'region = "us-east"\n[redis]\nurl = 6379\n',
        "redis.url: expected a string, got an integer",
        id="integer-for-string",
    ),
    pytest.param(
        'region = "us-east"\ngateway = 5\n[redis]\nurl = "redis://h"\n',
        "gateway: expected a table, got an integer",
        id="value-for-table",
    ),
    pytest.param(
        MINIMAL + '[peers]\nname = "eu-west"\nurl = "redis://h"\n',
        "peers: expected an array of tables ([[...]]), got a table",
        id="table-for-array-of-tables",
    ),
    pytest.param(
        'region = "us-east"\npeers = ["eu-west"]\n[redis]\nurl = "redis://h"\n',
        "peers[0]: expected a table, got a string",
        id="string-in-peers",
    ),
    pytest.param(
        'region = "us-east"\n[redis]\nurl = "http://127.0.0.1:6379"\n',
        "redis.url: 'http://127.0.0.1:6379' must start with redis://, rediss:// or unix://",
        id="bad-url-scheme",
    ),
    pytest.param(
        'region = "us-east"\n[redis]\nurl = "127.0.0.1:6379"\n',
        "redis.url: '127.0.0.1:6379' must start with redis://, rediss:// or unix://",
        id="url-without-scheme",
    ),
    pytest.param(
        MINIMAL + '[cache]\nurl = "tls://:hunter2@cache:6379"\n',
        "cache.url: 'tls://:***@cache:6379' must start with redis://",
        id="bad-url-scheme-password-hidden",
    ),
    pytest.param(
        MINIMAL + '[[peers]]\nname = "eu-west"\nurl = "tcp://h"\n',
        "peers[0].url: 'tcp://h' must start with redis://",
        id="bad-peer-url-scheme",
    ),
    pytest.param(
        'region = "us-east"\n[redis]\nurl = "redis://h:6379/0?socket_timeout=30"\n',
        "redis.url: query parameter 'socket_timeout' would override the gateway's own setting; "
        "set socket_timeout_ms instead",
        id="timeout-in-url",
    ),
    pytest.param(
        MINIMAL + '[[peers]]\nname = "eu-west"\nurl = "rediss://h?decode_responses=yes"\n',
        "peers[0].url: query parameter 'decode_responses' would override the gateway's own "
        "setting; remove it",
        id="client-option-in-url",
    ),
    pytest.param(
        'region = "us-east"\n[redis]\nurl = "redis://h:6379?db=zero"\n',
        "redis.url: Invalid value for 'db' in connection URL.",
        id="bad-url-query-value",
    ),
    pytest.param(
        'region = "US East"\n[redis]\nurl = "redis://h"\n',
        "region: must be lower-case letters, digits, '.', '_' or '-' (at most 63)",
        id="bad-region-name",
    ),
    pytest.param(
        MINIMAL + '[[peers]]\nname = "EU"\nurl = "redis://h"\n',
        "peers[0].name: must be lower-case letters, digits, '.', '_' or '-' (at most 63)",
        id="bad-peer-name",
    ),
    pytest.param(
        MINIMAL + '[[peers]]\nname = "us-east"\nurl = "redis://h"\n',
        "peers[0].name: 'us-east' is this region; a region is not its own peer",
        id="self-peer",
    ),
    pytest.param(
        MINIMAL
        + '[[peers]]\nname = "eu-west"\nurl = "redis://a"\n'
        + '[[peers]]\nname = "ap-south"\nurl = "redis://b"\n'
        + '[[peers]]\nname = "eu-west"\nurl = "redis://c"\n',
        "peers[2].name: 'eu-west' is already listed as peers[0]",
        id="duplicate-peer",
    ),
    pytest.param(
        MINIMAL + "[gateway]\nblock_ms = 5000\n",
        "gateway.block_ms: 5000 must be below redis.socket_timeout_ms (5000), "
        "or every idle read would time out",
        id="block-not-below-socket-timeout",
    ),
    pytest.param(
        MINIMAL + "socket_timeout_ms = 800\n",
        "gateway.block_ms: 1000 must be below redis.socket_timeout_ms (800)",
        id="socket-timeout-below-default-block",
    ),
    pytest.param(
        MINIMAL + "[gateway]\nbatch_size = 0\n",
        "gateway.batch_size: must be between 1 and 10000",
        id="batch-size-range",
    ),
    pytest.param(
        MINIMAL + "[gateway]\nclaim_idle_ms = 0\n",
        "gateway.claim_idle_ms: must be positive",
        id="non-positive-interval",
    ),
    pytest.param(
        MINIMAL + "retries = -1\n", "redis.retries: must be 0 or more", id="negative-retries"
    ),
    pytest.param(
        MINIMAL + "backoff_base_ms = 200\nbackoff_cap_ms = 100\n",
        "redis.backoff_cap_ms: must not be below backoff_base_ms",
        id="backoff-cap-below-base",
    ),
    pytest.param(
        MINIMAL + "[streams]\nmax_len = 10\n",
        "streams.max_len: must be at least 1000",
        id="stream-cap-too-small",
    ),
    pytest.param(
        MINIMAL + '[streams]\nnamespace = ""\n',
        "streams.namespace: must not be empty",
        id="empty-namespace",
    ),
    pytest.param(
        MINIMAL + "[streams]\npartitions = 0\n",
        "streams.partitions: must be between 1 and 1024",
        id="partitions-range",
    ),
    pytest.param(
        MINIMAL + '[streams]\npartitions = 4\nlocal = "inv{x}"\n',
        "streams.local: a partitioned stream's name must not hold '{' or '}'",
        id="partitioned-stream-with-braces",
    ),
    pytest.param(
        MINIMAL + '[[peers]]\nname = "eu-west"\nurl = "redis://h"\npartitions = 2000\n',
        "peers[0].partitions: must be between 1 and 1024",
        id="peer-partitions-range",
    ),
    pytest.param(
        MINIMAL + "[limits]\nmax_keys = 0\n", "limits.max_keys: must be positive", id="limits"
    ),
    pytest.param(
        MINIMAL + "[metrics]\nport = 70000\n",
        "metrics.port: must be between 0 and 65535",
        id="metrics-port",
    ),
    pytest.param(
        'region = "us-east"\n[redis]\nurl = "redis://:${INVALGW_TEST_UNSET}@h:6379"\n',
        "redis.url: environment variable INVALGW_TEST_UNSET is not set",
        id="unset-env-variable",
    ),
    pytest.param(
        MINIMAL + '[[peers]]\nname = "eu-west"\nurl = "redis://${INVALGW_TEST_UNSET}:6379"\n',
        "peers[0].url: environment variable INVALGW_TEST_UNSET is not set",
        id="unset-env-variable-in-peer",
    ),
    pytest.param(
        'region = "us-east"\n[redis\nurl = "redis://h"\n',
        "not valid TOML: Expected ']' at the end of a table declaration (at line 2, ",
        id="not-toml",
    ),
    pytest.param(
        'region = "us-east"\nregion = "eu-west"\n',
        "not valid TOML: Cannot overwrite a value (at line 2, column ",
        id="key-twice",
    ),
]


@pytest.mark.parametrize(("text", "line"), MISTAKES)
def test_each_mistake_is_one_line_naming_file_field_and_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, line: str
) -> None:
    monkeypatch.delenv("INVALGW_TEST_UNSET", raising=False)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == str(path)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert str(caught.value).startswith(f"{path}: {line}")
    assert "\n" not in str(caught.value)


def test_all_mistakes_are_reported_in_one_pass(tmp_path: Path) -> None:
    text = """\
region = "us-east"
colour = "blue"

[redis]
url = "http://h:6379"

[gateway]
batch_size = "many"
block = 100

[[peers]]
name = "eu-west"
url = "tcp://h"

[[peers]]
name = "ap-south"
url = "ftp://h"
"""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    wheres = [problem.split(":", 1)[0] for problem in caught.value.problems]
    assert sorted(wheres) == sorted(
        [
            "colour",
            "redis.url",
            "gateway.block",
            "gateway.batch_size",
            "peers[0].url",
            "peers[1].url",
        ]
    )
    assert str(caught.value).splitlines() == [f"{path}: {p}" for p in caught.value.problems]


def test_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nowhere.toml")
    assert str(caught.value) == f"{tmp_path / 'nowhere.toml'}: file not found"


def test_unreadable_file(tmp_path: Path) -> None:
    directory = tmp_path / "regions.toml"
    directory.mkdir()
    with pytest.raises(ConfigError) as caught:
        load_config(directory)
    assert str(caught.value) == f"{directory}: cannot read: Is a directory"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'region = "caf\xe9"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read: not UTF-8 text (byte 0xe9 at 13)"


def test_parse_config_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^<generated>: region: required field is missing$"):
        parse_config({"redis": {"url": "redis://h"}}, "<generated>")


# --- Redis URL forms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://gateway:s3cret@h:6380/1", "rediss://gateway:***@h:6380/1"),
        ("redis://gateway:p%40ss@h", "redis://gateway:***@h"),
        ("unix:///run/redis/redis.sock?db=2", "unix:///run/redis/redis.sock?db=2"),
    ],
)
def test_redact_hides_only_the_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_url_forms_make_the_right_clients() -> None:
    """TLS for rediss://, a socket for unix://, and the configured timeouts on every client."""
    for url, connection in [
        ("redis://gateway:pw@h:6379/3", redis.asyncio.connection.Connection),
        ("rediss://h:6380/0", redis.asyncio.connection.SSLConnection),
        ("unix:///run/redis.sock?db=1", redis.asyncio.connection.UnixDomainSocketConnection),
        ("rediss://h:6380/0?ssl_ca_certs=/etc/ssl/ca.pem", redis.asyncio.connection.SSLConnection),
    ]:
        endpoint = RedisEndpoint(url=url, socket_timeout_ms=1500, connect_timeout_ms=700)
        client = connect(endpoint, name="t")
        pool = client.connection_pool
        assert issubclass(pool.connection_class, connection)
        assert pool.connection_kwargs["socket_timeout"] == 1.5
        assert pool.connection_kwargs["socket_connect_timeout"] == 0.7
    sync = connect_sync(RedisEndpoint(url="redis://gateway:pw@h:6379/3"), name="t")
    assert sync.connection_pool.connection_kwargs["password"] == "pw"
    assert sync.connection_pool.connection_kwargs["db"] == 3
    sync.close()


# --- the region files in the repository ----------------------------------------------------------


def region_files() -> list[Path]:
    return sorted((REPO / "regions").glob("*.toml"))


@pytest.mark.parametrize("path", region_files(), ids=lambda path: path.stem)
def test_repository_region_files_load(path: Path) -> None:
    config = load_config(path)
    assert config.region == path.stem


def test_repository_regions_form_a_full_mesh() -> None:
    configs = {config.region: config for config in map(load_config, region_files())}
    assert len(configs) >= 2
    for region, config in configs.items():
        assert {peer.name for peer in config.peers} == set(configs) - {region}
        for peer in config.peers:
            assert peer.url == configs[peer.name].redis.url, f"{region} → {peer.name}"
    assert len({config.metrics.port for config in configs.values()}) == len(configs)


# --- the CLI -------------------------------------------------------------------------------------


def test_check_prints_each_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, MINIMAL + '[gateway]\nbatch_size = "x"\nblock = 1\n')
    assert main(["check", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert sorted(err.splitlines()) == [
        f"invalgw: {path}: gateway.batch_size: expected an integer, got a string",
        f"invalgw: {path}: gateway.block: unknown field (known fields: batch_size, block_ms, "
        "claim_idle_ms, claim_interval_ms, consumer, drain_timeout_ms, feed_batches, "
        "heartbeat_interval_ms, "
        "lease_ms, linger_ms, retry_backoff_cap_ms, trim_interval_ms, window_batches)",
    ]


def test_check_of_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--config", str(tmp_path / "x.toml")]) == 2
    assert capsys.readouterr().err == f"invalgw: {tmp_path / 'x.toml'}: file not found\n"


@pytest.fixture
def region_configs(session_servers: list[RedisServer], namespace: str) -> dict[str, RegionConfig]:
    urls = {region: server.url for region, server in zip(REGIONS, session_servers, strict=True)}
    return make_configs(urls, namespace)


def test_check_reaches_every_redis_and_exits_0(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    region_configs: dict[str, RegionConfig],
    session_servers: list[RedisServer],
) -> None:
    config = region_configs["us-east"]
    path = write_config(tmp_path / "us-east.toml", config)
    assert main(["check", "--config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path}: valid config for region us-east"
    assert [line.split(":")[0] for line in lines[1:]] == [
        "ok    us-east (redis)",
        "ok    peer eu-west",
        "ok    peer ap-south",
    ]
    assert f"{session_servers[1].url} (Redis 7" in lines[2]


def test_check_names_the_peer_it_cannot_reach_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], session_servers: list[RedisServer]
) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    urls = {"us-east": session_servers[0].url, "eu-west": down, "ap-south": session_servers[2].url}
    path = write_config(tmp_path / "us-east.toml", make_configs(urls, "t")["us-east"])
    assert main(["check", "--config", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].startswith("ok    us-east (redis)")
    assert lines[1].startswith(f"FAIL  peer eu-west: {down}: ")
    assert lines[2].startswith("ok    peer ap-south")


def test_check_offline_validates_the_file_without_reaching_any_redis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    urls = dict.fromkeys(("us-east", "eu-west", "ap-south"), down)
    path = write_config(tmp_path / "us-east.toml", make_configs(urls, "t")["us-east"])
    assert main(["check", "--offline", "--config", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{path}: valid config for region us-east"]
    assert main(["check", "--config", str(path)]) == 1  # the same file, online: nothing answers


def test_check_never_prints_a_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], session_servers: list[RedisServer]
) -> None:
    """A wrong password fails the check; the output names the URL without the password."""
    url = session_servers[0].url.replace("redis://", "redis://gateway:hunter2@")
    raw = MINIMAL.replace("redis://127.0.0.1:6379/0", url) + "retries = 0\n"
    path = write(tmp_path, raw)
    assert main(["check", "--config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "FAIL  us-east (redis): redis://gateway:***@127.0.0.1:" in out
    assert "hunter2" not in out + err


@pytest.fixture
def us_east_file(tmp_path: Path, region_configs: dict[str, RegionConfig]) -> Path:
    return write_config(tmp_path / "us-east.toml", region_configs["us-east"])


def test_publish_writes_an_entry_the_gateway_accepts(
    us_east_file: Path,
    capsys: pytest.CaptureFixture[str],
    region_configs: dict[str, RegionConfig],
) -> None:
    config = region_configs["us-east"]
    keys = ["user:1001:profile", "report for 2024", "ключ"]
    argv = ["publish", "--config", str(us_east_file), "--source", "billing", *keys]
    assert main(argv) == 0
    entry_id = capsys.readouterr().out.strip()
    client = connect_sync(config.redis, name="test")
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(  # type: ignore[assignment]
            config.streams.local, entry_id, entry_id
        )
    finally:
        client.close()
    [(stored_id, fields)] = entries
    invalidation = parse_entry(stored_id.decode(), fields, config.limits)
    assert invalidation.keys == keys
    assert invalidation.source == "billing"
    assert invalidation.id == entry_id


def test_publish_unlink_local_removes_the_keys_here_at_once(
    us_east_file: Path,
    capsys: pytest.CaptureFixture[str],
    region_configs: dict[str, RegionConfig],
) -> None:
    config = region_configs["us-east"]
    key = f"{config.streams.namespace}-key:user:1001:profile"
    client = connect_sync(config.redis, name="test")
    try:
        client.set(key, "cached")
        assert main(["publish", "--config", str(us_east_file), "--unlink-local", key]) == 0
        assert client.exists(key) == 0
        assert client.xlen(config.streams.local) == 1
    finally:
        client.close()
    assert capsys.readouterr().out.strip().count("-") == 1


def test_publish_unlink_local_uses_the_region_cache_when_it_is_separate(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    region_configs: dict[str, RegionConfig],
    session_servers: list[RedisServer],
) -> None:
    """With a ``[cache]`` section the keys live there, not in the stream's Redis."""
    config = region_configs["us-east"]
    cache_url = session_servers[2].url
    path = write_config(tmp_path / "us-east.toml", config)
    path.write_text(path.read_text() + f'\n[cache]\nurl = "{cache_url}"\n')
    key = f"{config.streams.namespace}-key:user:1001:profile"
    cache = connect_sync(RedisEndpoint(url=cache_url), name="test")
    try:
        cache.set(key, "cached")
        assert main(["publish", "--config", str(path), "--unlink-local", key]) == 0
        assert cache.exists(key) == 0
    finally:
        cache.close()
    capsys.readouterr()


def test_publish_to_an_unreachable_redis_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    text = f'region = "us-east"\n[redis]\nurl = "{down}"\nretries = 0\n'
    assert main(["publish", "--config", str(write(tmp_path, text)), "k"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"invalgw: us-east: {down}: ")
    assert len(err.splitlines()) == 1


def test_run_names_a_metrics_port_in_use(tmp_path: Path) -> None:
    """A gateway that cannot serve its metrics says so in one line, not with a traceback."""
    import socket
    import subprocess
    import sys

    from invalgw.config import to_toml
    from invalgw.dev.localredis import RedisProcess

    server = RedisProcess(preexec=die_with_parent).start()
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config = parse_config(
                {"region": "us-east", "redis": {"url": server.url}, "metrics": {"port": port}}
            )
            path = tmp_path / "us-east.toml"
            path.write_text(to_toml(config))
            result = subprocess.run(
                [sys.executable, "-m", "invalgw", "run", "--config", str(path)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
    finally:
        server.cleanup()
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port} (Address already in use)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("linger_ms", [-1, 101])
def test_linger_is_bounded(tmp_path: Path, linger_ms: int) -> None:
    path = write(tmp_path, MINIMAL + f"[gateway]\nlinger_ms = {linger_ms}\n")
    assert main(["check", "--config", str(path)]) == 2


# --- a peer's partitions, against the peer's own file ---------------------------------------


def region_file(region: str, peers: dict[str, int], partitions: int = 1, url: str = "") -> str:
    """A region file: its stream's partitions, and each peer with the partitions it names."""
    text = f'region = "{region}"\n\n[redis]\nurl = "{url or "redis://127.0.0.1:6379/0"}"\n'
    text += f"\n[streams]\npartitions = {partitions}\n"
    for peer, count in peers.items():
        text += f'\n[[peers]]\nname = "{peer}"\nurl = "redis://127.0.0.1:6380/0"\n'
        text += f"partitions = {count}\n"
    return text


def test_a_peer_s_partitions_are_held_to_the_peer_s_own_file(tmp_path: Path) -> None:
    east = write(tmp_path, region_file("us-east", {"eu-west": 4, "ap-south": 1}))
    west = write(tmp_path, region_file("eu-west", {}, 8), "w.toml")
    config = load_config(east)
    together = [given(str(west), load_config(west))]
    [problem] = partition_mismatches(str(east), config, together)
    assert problem == (
        f"peers[0].partitions: 4 for peer 'eu-west', but {west} has [streams] partitions = 8; "
        "they must match, or the mirror streams of eu-west here are named for the wrong "
        "partitions"
    )
    write(tmp_path, region_file("eu-west", {}, 4), "w.toml")
    assert partition_mismatches(str(east), config, [given(str(west), load_config(west))]) == []
    assert partition_mismatches(str(east), config) == [], "nothing at hand: nothing to compare"


def test_the_peer_s_file_beside_is_read_without_its_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``<peer>.toml`` next to the file is compared too; its ``${VAR}`` need not be set here."""
    monkeypatch.delenv("WEST_PASSWORD", raising=False)
    east = write(tmp_path, region_file("us-east", {"eu-west": 1, "ap-south": 2}))
    url = "redis://gw:${WEST_PASSWORD}@127.0.0.1:6379/0"
    beside = write(tmp_path, region_file("eu-west", {}, 2, url), "eu-west.toml")
    write(tmp_path, "region = [not toml", "ap-south.toml")  # its own check says what is wrong
    [problem] = partition_mismatches(str(east), load_config(east))
    assert problem.startswith(f"peers[0].partitions: 1 for peer 'eu-west', but {beside} has ")
    assert "[streams] partitions = 2;" in problem
    write(tmp_path, region_file("ap-south", {}, 2), "ap-south.toml")
    write(tmp_path, region_file("eu-west", {}, 1, url), "eu-west.toml")
    assert partition_mismatches(str(east), load_config(east)) == []
    write(tmp_path, region_file("somewhere", {}, 5), "eu-west.toml")  # another region's file
    assert partition_mismatches(str(east), load_config(east)) == []


def test_check_refuses_peers_partitions_that_differ_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    east = write(tmp_path / "a", region_file("us-east", {"eu-west": 1}, 2))
    west = write(tmp_path / "b", region_file("eu-west", {"us-east": 2}, 3), "west.toml")
    assert main(["check", "--offline", "--config", str(east)]) == 0, "eu-west's file not at hand"
    capsys.readouterr()
    assert main(["check", "--offline", "--config", str(east), "--config", str(west)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"invalgw: {east}: peers[0].partitions: 1 for peer 'eu-west', but {west} has "
        "[streams] partitions = 3; they must match, or the mirror streams of eu-west here are "
        "named for the wrong partitions\n"
    )
    write(tmp_path / "b", region_file("eu-west", {"us-east": 2}, 1), "west.toml")
    assert main(["check", "--offline", "--config", str(east), "--config", str(west)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{east}: valid config for region us-east",
        f"{west}: valid config for region eu-west",
    ]
    # beside it: eu-west.toml in the same directory is compared without being named
    write(tmp_path / "a", region_file("eu-west", {"us-east": 2}, 1), "eu-west.toml")
    assert main(["check", "--offline", "--config", str(east)]) == 0
    write(tmp_path / "a", region_file("eu-west", {"us-east": 1}, 1), "eu-west.toml")
    assert main(["check", "--offline", "--config", str(tmp_path / "a" / "eu-west.toml")]) == 2
    assert f"peers[0].partitions: 1 for peer 'us-east', but {east} has" in capsys.readouterr().err
