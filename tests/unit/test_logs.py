"""PGCAST_LOG_FORMAT=json: one JSON object per record."""

from __future__ import annotations

import json
import logging
import sys
import uuid

import pytest

from pgcast.bin import logs


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("pgcast.worker", logging.WARNING, __file__, 1, msg, args or None, None)
    r.__dict__.update(extra)
    return r


def test_a_record_is_one_json_line_with_the_broadcast_it_names() -> None:
    bid = uuid.uuid4()
    line = logs.JsonFormatter().format(record("pausing broadcast %s: %s", bid, "line\nbreak"))
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "WARNING" and out["logger"] == "pgcast.worker"
    assert out["message"] == f"pausing broadcast {bid}: line\nbreak"
    assert out["broadcast_id"] == str(bid)
    assert out["timestamp"].endswith("Z") and "T" in out["timestamp"]


def test_broadcast_id_from_extra_first_and_absent_when_none() -> None:
    given, other = uuid.uuid4(), uuid.uuid4()
    out = json.loads(logs.JsonFormatter().format(record("x %s", other, broadcast_id=given)))
    assert out["broadcast_id"] == str(given)
    out = json.loads(logs.JsonFormatter().format(record("worker %s started", "host:1")))
    assert "broadcast_id" not in out


def test_an_exception_is_kept_in_the_object() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        r = record("failed")
        r.exc_info = sys.exc_info()
    out = json.loads(logs.JsonFormatter().format(r))
    assert "RuntimeError: boom" in out["exception"]


def test_the_format_is_checked() -> None:
    assert logs.log_format({}) == "text"
    assert logs.log_format({"PGCAST_LOG_FORMAT": " JSON "}) == "json"
    with pytest.raises(ValueError, match="text or json"):
        logs.log_format({"PGCAST_LOG_FORMAT": "xml"})
