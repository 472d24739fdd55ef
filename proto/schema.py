"""JSON Schemas generated from the wire structs.

``python -m invalgw.proto.schema`` rewrites ``proto/schema/*.json``; a test checks that the
committed files match the structs, so the published contract cannot drift from the code.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from invalgw.proto.entry import CONTRACT_VERSION, ProducerEntry
from invalgw.proto.envelope import Envelope

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"


def schemas() -> dict[str, dict[str, Any]]:
    """File name → JSON Schema, for every public wire struct."""
    producer = msgspec.json.schema(ProducerEntry)
    producer["title"] = f"Invalidation stream entry, contract v{CONTRACT_VERSION}"
    producer["description"] = (
        "The flat string fields of one XADD into a region's invalidation stream. "
        "Unknown fields are ignored."
    )
    envelope = msgspec.json.schema(Envelope)
    envelope["title"] = "Mirror stream envelope (MessagePack in field 'd')"
    return {"producer-entry.json": _tidy(producer), "envelope.json": _tidy(envelope)}


def _tidy(node: Any) -> Any:
    """Descriptions as :func:`inspect.cleandoc` gives them, whatever msgspec version made them
    (0.23 keeps a docstring's indentation, 0.22 did not), so the committed files stay stable."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value) if key == "description" else _tidy(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_tidy(value) for value in node]
    return node


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> int:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, schema in schemas().items():
        (SCHEMA_DIR / name).write_text(render(schema))
        sys.stdout.write(f"wrote {SCHEMA_DIR / name}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
