"""Logging set-up for the command line: plain text (the default) or one JSON object per line.

Only the CLI calls :func:`configure`; the library only logs. In JSON every line carries ``time``
(UTC, ISO 8601), ``level``, ``logger`` and ``message``, then the structured fields a call passed
with ``extra=`` (``region``, ``peer``, ``stream``, ``ids``, counts…) and the fields bound with
:func:`bind` for the whole process (a gateway binds its ``region``), then ``exception`` if any.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
from typing import Any, TextIO

import msgspec

FORMATS = ("text", "json")
ENV_FORMAT = "INVALGW_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_bound: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "invalgw_log_fields", default=None
)
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


def default_format() -> str:
    """``INVALGW_LOG_FORMAT`` if it names a format, else ``text``."""
    value = os.environ.get(ENV_FORMAT, "").strip().lower()
    return value if value in FORMATS else "text"


def bind(**fields: Any) -> contextvars.Token[dict[str, Any] | None]:
    """Add ``fields`` to every JSON line logged from this context (and tasks started from it);
    :func:`unbind` with the token returned goes back to what was bound before."""
    return _bound.set({**(_bound.get() or {}), **fields})


def unbind(token: contextvars.Token[dict[str, Any] | None]) -> None:
    _bound.reset(token)


def _plain(value: Any) -> Any:
    """Bytes (keys, stream IDs) as text a human reads; never a crash over a strange key."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="backslashreplace")
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    return value


def _fallback(value: Any) -> Any:
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self) -> None:
        super().__init__()
        self._encoder = msgspec.json.Encoder(enc_hook=_fallback)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_bound.get() or {})
        line.update(
            (key, _plain(value)) for key, value in record.__dict__.items() if key not in _STANDARD
        )
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(line).decode()


def _iso_time(created: float) -> str:
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def configure(level: str = "info", log_format: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) in ``log_format``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
