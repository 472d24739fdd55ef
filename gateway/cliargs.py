"""From the command line to typed options: the one place an ``argparse.Namespace`` is read.

Each command declares its options as a frozen dataclass whose field names are the parser's
``dest`` names, and registers itself with :func:`bind`. :func:`options_from` builds that
dataclass from the parsed namespace, so a command's logic receives typed, immutable options and
never sees argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def bind(parser: argparse.ArgumentParser, run: Callable[[T], int], options: type[T]) -> None:
    """Make ``parser``'s command call ``run`` with an ``options`` built from its arguments."""
    parser.set_defaults(_run=run, _options=options)


def options_from(namespace: argparse.Namespace, options: type[Any]) -> Any:
    """An ``options`` dataclass filled from ``namespace`` (lists become tuples)."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(options):
        if not hasattr(namespace, field.name):
            continue
        value = getattr(namespace, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return options(**values)


def command_from(namespace: argparse.Namespace) -> Callable[[], int]:
    """The command the user asked for, with its options bound."""
    run: Callable[[Any], int] = namespace._run
    options = options_from(namespace, namespace._options)
    return lambda: run(options)
