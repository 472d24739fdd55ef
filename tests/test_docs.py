"""The published documents must say what the code does, so they cannot drift.

- docs/configuration.md: every field of every config section, with its type and default.
- proto/README.md: every producer field, every dead-letter code, the limits, the envelope fields,
  and redis-cli examples the gateway really accepts.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from invalgw.config import (
    CacheEndpoint,
    Metrics,
    Peer,
    RedisEndpoint,
    RegionConfig,
    Streams,
    Tuning,
    parse_config,
)
from invalgw.deadletter import REASONS as DEAD_LETTER_REASONS
from invalgw.policy import Policy, Rule
from invalgw.proto import Batch, Heartbeat, InvalidEntry, Limits, ProducerEntry, parse_entry
from invalgw.proto.entry import INVALID_ENTRY_CODES

REPO = Path(__file__).parent.parent
CONFIGURATION = (REPO / "docs" / "configuration.md").read_text()
CONTRACT = (REPO / "proto" / "README.md").read_text()

SECTIONS: dict[str, type[msgspec.Struct]] = {
    "Top level": RegionConfig,
    "`[redis]` and `[cache]`": CacheEndpoint,
    "`[[peers]]`": Peer,
    "`[streams]`": Streams,
    "`[gateway]`": Tuning,
    "`[limits]`": Limits,
    "`[metrics]`": Metrics,
    "`[policy]`": Policy,
    "`[[policy.rules]]`": Rule,
}


def sections(markdown: str) -> dict[str, str]:
    """Level-2 heading → the text under it."""
    parts = re.split(r"^## (.+)$", markdown, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def table_rows(text: str, first_header: str | None = None) -> dict[str, list[str]]:
    """Rows of the markdown tables in ``text`` (only those whose first column is headed
    ``first_header``, if given): field name in backticks → the other cells.
    ``| `a`, `b` | ...`` gives a row for each name."""
    rows: dict[str, list[str]] = {}
    header: str | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells[0]
            continue
        if not cells[0].startswith("`") or first_header not in (None, header):
            continue
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows[name] = cells[1:]
    return rows


def field_type(annotation: Any) -> str:
    """How docs/configuration.md names a field's type."""
    info = msgspec.inspect.type_info(annotation)
    if isinstance(info, msgspec.inspect.UnionType):
        info = next(t for t in info.types if not isinstance(t, msgspec.inspect.NoneType))
    if isinstance(info, msgspec.inspect.ListType):
        inner = info.item_type
        return "array of tables" if isinstance(inner, msgspec.inspect.StructType) else "array"
    kinds = {
        msgspec.inspect.IntType: "integer",
        msgspec.inspect.StrType: "string",
        msgspec.inspect.LiteralType: "string",
        msgspec.inspect.BoolType: "boolean",
        msgspec.inspect.TupleType: "array",
    }
    return kinds.get(type(info), "table")


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return str(value)


# --- docs/configuration.md ------------------------------------------------------------------


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_every_config_field_is_documented_with_type_and_default(heading: str) -> None:
    struct = SECTIONS[heading]
    text = sections(CONFIGURATION).get(heading)
    assert text is not None, f"docs/configuration.md has no section '## {heading}'"
    rows = table_rows(text)
    fields = msgspec.structs.fields(struct)
    assert sorted(rows) == sorted(f.encode_name for f in fields), heading
    for field in fields:
        type_cell, default_cell = rows[field.encode_name][:2]
        assert type_cell == field_type(field.type), f"{heading} {field.name}: type"
        if field.required:
            assert default_cell == "required", f"{heading} {field.name}: default"
        elif field.default is None:
            assert default_cell == "none", f"{heading} {field.name}: default"
        elif isinstance(field.default, msgspec.Struct):
            assert default_cell.startswith("see "), f"{heading} {field.name}: default"
        else:
            default = (
                field.default_factory() if field.default is msgspec.NODEFAULT else field.default
            )
            literal = toml_literal(default)
            assert default_cell.startswith(f"`{literal}`"), (
                f"{heading} {field.name}: the default is {literal}, the docs say {default_cell}"
            )


def annotated_example() -> str:
    text = sections(CONFIGURATION)["A complete annotated example"]
    match = re.search(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    assert match is not None
    return match.group(1)


def test_annotated_example_is_a_valid_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_PASSWORD", "PEER_PASSWORD_US_EAST", "PEER_PASSWORD_AP_SOUTH"):
        monkeypatch.setenv(name, "pw")
    config = parse_config(tomllib.loads(annotated_example()), "docs/configuration.md")
    assert config.region == "eu-west"
    assert [peer.name for peer in config.peers] == ["us-east", "ap-south"]


def test_annotated_example_sets_every_field() -> None:
    raw = tomllib.loads(annotated_example())
    expected: dict[str, type[msgspec.Struct]] = {
        "": RegionConfig,
        "redis": RedisEndpoint,
        "streams": Streams,
        "gateway": Tuning,
        "limits": Limits,
        "metrics": Metrics,
        "policy": Policy,
        "policy.rules[0]": Rule,
    }
    for section, struct in expected.items():
        table: Any = raw
        for part in filter(None, section.replace("[0]", "").split(".")):
            table = table[part]
        if section.endswith("[0]"):
            table = table[0]
        missing = {f.encode_name for f in msgspec.structs.fields(struct)} - set(table)
        assert not missing, f"the example's [{section}] leaves out {sorted(missing)}"


# --- proto/README.md ------------------------------------------------------------------------


def test_every_producer_field_is_documented() -> None:
    rows = table_rows(sections(CONTRACT)["1. Invalidating keys: one XADD"], "Field")
    fields = {f.encode_name for f in msgspec.structs.fields(ProducerEntry)}
    assert fields <= set(rows)
    for field in msgspec.structs.fields(ProducerEntry):
        required = rows[field.encode_name][0]
        assert required == ("yes" if field.required else "no"), field.name


def documented_codes() -> set[str]:
    """The codes listed in :class:`InvalidEntry`'s docstring."""
    assert InvalidEntry.__doc__ is not None
    listed = InvalidEntry.__doc__.split("for metrics", 1)[1]
    return set(re.findall(r"``(\w+)``", listed))


def test_every_dead_letter_code_is_documented() -> None:
    codes = table_rows(sections(CONTRACT)["3. Limits and dead letters"], "Code")
    assert set(codes) == set(DEAD_LETTER_REASONS)
    assert documented_codes() - {"deleted"} == set(INVALID_ENTRY_CODES)
    assert "`deleted`" in CONTRACT


def test_documented_limits_are_the_defaults() -> None:
    rows = table_rows(sections(CONTRACT)["3. Limits and dead letters"], "Limit")
    assert set(rows) == {f.name for f in msgspec.structs.fields(Limits)}
    for field in msgspec.structs.fields(Limits):
        assert rows[field.name][0] == str(field.default), field.name


@pytest.mark.parametrize("struct", [Batch, Heartbeat])
def test_every_envelope_field_is_documented(struct: type[msgspec.Struct]) -> None:
    rows = table_rows(sections(CONTRACT)["5. Mirror envelopes (gateway to gateway)"], "Key")
    assert {f.encode_name for f in msgspec.structs.fields(struct)} | {"type"} <= set(rows)


def redis_cli_examples() -> list[list[str]]:
    text = CONTRACT.replace("\\\n", " ")
    commands = re.findall(r"^\$ redis-cli (XADD invalidations .*)$", text, flags=re.MULTILINE)
    return [shlex.split(command) for command in commands]


def test_readme_has_redis_cli_examples() -> None:
    assert len(redis_cli_examples()) >= 3


@pytest.mark.parametrize("argv", redis_cli_examples(), ids=lambda argv: " ".join(argv[3:7]))
def test_redis_cli_examples_are_accepted(argv: list[str]) -> None:
    """What the README tells people to type must be an entry the gateway applies."""
    assert argv[:3] == ["XADD", "invalidations", "*"]
    pairs = argv[3:]
    assert len(pairs) % 2 == 0
    fields = {pairs[i].encode(): pairs[i + 1].encode() for i in range(0, len(pairs), 2)}
    invalidation = parse_entry("1-0", fields, Limits())
    assert invalidation.keys or invalidation.pattern
    assert all(key.strip() == key for key in invalidation.keys)
