"""Log setup of the long-running commands: text, or one JSON object per line (PGCAST_LOG_FORMAT)."""

from __future__ import annotations

import datetime
import json
import logging
import logging.config
import os
import uuid
from typing import Any

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, message, broadcast_id if any."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (newlines in the message are escaped)."""
        out: dict[str, Any] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        broadcast = broadcast_of(record)
        if broadcast is not None:
            out["broadcast_id"] = broadcast
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def broadcast_of(record: logging.LogRecord) -> str | None:
    """The broadcast a record is about: its `broadcast_id` extra, else its first UUID argument
    (pgcast's log lines pass broadcast ids as uuid.UUID and nothing else as one)."""
    given = getattr(record, "broadcast_id", None)
    if given is not None:
        return str(given)
    args = record.args if isinstance(record.args, tuple) else ()
    return next((str(a) for a in args if isinstance(a, uuid.UUID)), None)


def log_format(environ: dict[str, str] | None = None) -> str:
    """PGCAST_LOG_FORMAT, checked: `text` (the default) or `json`; ValueError otherwise."""
    raw = (environ if environ is not None else os.environ).get("PGCAST_LOG_FORMAT", "text")
    value = raw.strip().lower() or "text"
    if value not in FORMATS:
        raise ValueError(f"PGCAST_LOG_FORMAT must be text or json, not {raw!r}")
    return value


def dict_config(level: str, fmt: str, loggers: tuple[str, ...] = ()) -> dict[str, Any]:
    """A logging.config dictionary: every record to stderr in `fmt`; `loggers` (uvicorn's)
    hand theirs to the root instead of keeping handlers of their own."""
    formatter: dict[str, Any] = ({"()": f"{__name__}.JsonFormatter"} if fmt == "json"
                                 else {"format": TEXT})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"pgcast": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "pgcast",
                                "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {name: {"handlers": [], "propagate": True} for name in loggers},
    }


def configure(level: str) -> None:
    """Set up the root logger from PGCAST_LOG_FORMAT (the worker)."""
    logging.config.dictConfig(dict_config(level, log_format()))
