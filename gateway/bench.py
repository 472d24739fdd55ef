"""placeholder"""

from __future__ import annotations

from typing import Any


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("bench", help="bench")
    parser.set_defaults(command=lambda args: 0)
