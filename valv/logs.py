"""Structured logging: one JSON object per line on stderr.

Callers pass structured fields with ``extra={"fields": {...}}``. Nothing that
is logged may contain key bytes, plaintext or tokens.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpclib logs every client disconnect at INFO/ERROR; keep its noise down.
    logging.getLogger("grpclib").setLevel(max(logging.WARNING, root.level))
    # h2 and hpack log every header they encode or decode at DEBUG, bearer
    # tokens ('authorization') included: never let them below WARNING.
    for name in ("h2", "hpack"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
