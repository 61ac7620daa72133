"""The server's operator log: standard ``logging`` to stderr, as text or one JSON object per line.

Events carry their fields in ``extra={"fields": {...}}``: the text format appends them as
``key=value``, the JSON format as keys of the object. Fields given to :func:`configure` (a worker's
``worker=N``) go on every line of the process. Nothing is logged per step at INFO.

Also the ready line: the one line ``dmm serve`` prints on stdout once it serves (tools wait for it).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

LOGGER = "dmm.server"
READY_PREFIX = "dmm serve: ready"
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

log = logging.getLogger(LOGGER)


def event(level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with structured ``fields``."""
    log.log(level, message, extra={"fields": fields})


def ready_line(grpc: str, metrics: str, **fields: Any) -> str:
    """``dmm serve: ready grpc=HOST:PORT metrics=HOST:PORT key=value ...``."""
    return " ".join(
        [READY_PREFIX, f"grpc={grpc}", f"metrics={metrics}", *(f"{k}={v}" for k, v in fields.items())]
    )


class _Formatter(logging.Formatter):
    def __init__(self, defaults: dict[str, Any]) -> None:
        super().__init__()
        self.defaults = defaults

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        return {**self.defaults, **getattr(record, "fields", {})}


class _Text(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        tail = "".join(f" {k}={v}" for k, v in self.fields(record).items())
        return f"{self.formatTime(record)} {record.levelname} {record.getMessage()}{tail}"


class _Json(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **self.fields(record),
        }
        return json.dumps(entry, default=str)


def configure(level: str = "info", fmt: str = "text", **fields: Any) -> None:
    """Send the server's log to stderr at ``level`` in ``fmt`` (replacing an earlier configuration);
    ``fields`` go on every line (before the event's own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json(fields) if fmt == "json" else _Text(fields))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
