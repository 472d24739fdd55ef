"""JSON Schemas generated from the wire structs.

``python -m proto.schema`` rewrites ``proto/schema/*.json``; a test checks that the committed
files match the structs, so the published contract cannot drift from the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from proto.entry import CONTRACT_VERSION, ProducerEntry
from proto.envelope import Envelope

SCHEMA_DIR = Path(__file__).parent / "schema"


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
    return {"producer-entry.json": producer, "envelope.json": envelope}


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
