"""The server's operator log: standard ``logging`` to stderr, as text or one JSON object per line.

Events carry their fields in ``extra={"fields": {...}}``: the text format appends them as
``key=value``, the JSON format as keys of the object. Nothing is logged per step at INFO.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

LOGGER = "dmm.server"
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

log = logging.getLogger(LOGGER)


def event(level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with structured ``fields``."""
    log.log(level, message, extra={"fields": fields})


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        tail = "".join(f" {k}={v}" for k, v in fields.items())
        return f"{self.formatTime(record)} {record.levelname} {record.getMessage()}{tail}"


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        return json.dumps(entry, default=str)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send the server's log to stderr at ``level`` in ``fmt`` (replacing an earlier configuration)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if fmt == "json" else _Text())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
