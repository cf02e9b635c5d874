"""Scheduled sends, retries and copies: checks and answers shared by the CLI and the API."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import uuid
from typing import Any

import psycopg

from pgcast.sql import errors, senders
from pgcast.sql.queries import QUERIES

PAST_TOLERANCE = dt.timedelta(minutes=1)  # a time this far in the past is still accepted
# How long a handed-off call may still be answered: a worker's lease (PGCAST_LEASE_SECONDS,
# default 30 s) plus the provider's longest call (SES: 5 s to connect + 30 s to read,
# worker/ses.py). `retry --include-unknown` leaves unknown rows handed off more recently.
DEFAULT_LEASE = 30.0  # seconds
PROVIDER_TIMEOUT = 35.0  # seconds
MAX_TIME_CHARS = 64  # an ISO 8601 time is far shorter


def parse_time(field: str, raw: Any, now: dt.datetime | None = None) -> dt.datetime:
    """An ISO 8601 time with an offset, at most a minute in the past; raises InvalidInput."""
    if not isinstance(raw, str) or not raw.strip():
        raise errors.InvalidInput(f"{field} must be an ISO 8601 time with an offset, "
                                  "e.g. 2026-12-24T09:00:00+01:00")
    text = raw.strip()
    if len(text) > MAX_TIME_CHARS:
        raise errors.InvalidInput(f"{field} is too long to be a time")
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise errors.InvalidInput(f"{field} is not an ISO 8601 time: {text!r} "
                                  "(e.g. 2026-12-24T09:00:00+01:00)") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise errors.InvalidInput(f"{field} has no offset: {text!r} is ambiguous; add one, "
                                  "e.g. +01:00 or Z")
    now = now or dt.datetime.now(dt.UTC)
    if when < now - PAST_TOLERANCE:
        raise errors.InvalidInput(f"{field} is in the past: {text!r}")
    return when


API_NAMES = ("at", "not_after")  # what errors call the two times: the API's JSON keys
CLI_NAMES = ("--at", "--not-after")  # ... and the command line's flags


def parse_window(at: Any, not_after: Any = None, now: dt.datetime | None = None,
                 names: tuple[str, str] = API_NAMES) -> tuple[dt.datetime, dt.datetime | None]:
    """The start time and the optional latest start; raises InvalidInput naming the field as
    the caller knows it."""
    start = parse_time(names[0], at, now)
    latest = None if not_after is None else parse_time(names[1], not_after, now)
    if latest is not None and latest < start:
        raise errors.InvalidInput(f"{names[1]} must not be earlier than {names[0]}")
    return start, latest


def _row(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> dict[str, Any]:
    row = conn.execute(QUERIES[query], params).fetchone()
    if row is None:
        raise errors.NotFound(f"no broadcast {params['id']}")
    return dict(row)


# -- answers: the same shapes and messages for the CLI and the API -------------------------


def schedule_result(row: dict[str, Any]) -> dict[str, Any]:
    """The answer to a schedule, from a pgcast_schedule_v1 row."""
    if not row["ok"]:
        return {"success": False, "status": row["status"],
                "message": f"Broadcast is {row['status']}; only a draft can be scheduled"}
    return {"success": True, "status": "scheduled", "scheduled_at": row["scheduled_at"],
            "not_after": row["not_after"],
            "message": f"Scheduled for {row['scheduled_at'].isoformat()}"}


def unschedule_result(row: dict[str, Any]) -> dict[str, Any]:
    """The answer to an unschedule, from a pgcast_unschedule_v1 row."""
    if not row["ok"]:
        return {"success": False, "status": row["status"],
                "message": f"Broadcast is {row['status']}; only a scheduled broadcast "
                           "can be unscheduled"}
    return {"success": True, "status": "draft", "message": "Unscheduled; back to draft"}


def in_doubt_seconds() -> float:
    """Seconds after its handoff an unknown row's call may still be answered: the lease
    (PGCAST_LEASE_SECONDS when set, as the workers read it) plus the provider's timeout."""
    raw = os.environ.get("PGCAST_LEASE_SECONDS", "").strip()
    try:
        lease = float(raw) if raw else DEFAULT_LEASE
    except ValueError:
        lease = DEFAULT_LEASE
    if not math.isfinite(lease) or lease < DEFAULT_LEASE:
        lease = DEFAULT_LEASE  # never shorter than the default: a worker may use it
    return lease + PROVIDER_TIMEOUT


def retry_result(row: dict[str, Any], include_unknown: bool) -> dict[str, Any]:
    """The answer to a retry, from a pgcast_retry_v3 row."""
    doubt = int(row.get("in_doubt") or 0)
    left = (f"; {doubt} unknown recipients were handed off too recently (their call may "
            "still be answered) and were left as they are") if doubt else ""
    if not row["ok"]:
        if row.get("archiving"):
            message = (f"Broadcast is {row['status']} and archived (or being archived) by "
                       "retention; its recipients can no longer be retried")
        elif row["status"] in ("sent", "failed"):
            what = "failed or unknown" if include_unknown else "failed"
            message = f"Broadcast is {row['status']} with no {what} recipients to retry{left}"
        else:
            message = (f"Broadcast is {row['status']}; only a finished (sent or failed) "
                       "broadcast can be retried")
        out = {"success": False, "status": row["status"], "requeued": 0, "message": message}
    else:
        n = row["requeued"]
        out = {"success": True, "status": "sending", "requeued": n,
               "message": f"Retrying {n} recipients{left}"}
    if include_unknown:
        out["in_doubt"] = doubt
    return out


# -- operations --------------------------------------------------------------------------


def schedule(conn: psycopg.Connection[Any], account: str, broadcast_id: uuid.UUID, at: Any,
             not_after: Any = None, details: dict[str, Any] | None = None,
             names: tuple[str, str] = API_NAMES) -> dict[str, Any]:
    """draft -> scheduled; raises InvalidInput (bad times) or NotFound."""
    start, latest = parse_window(at, not_after, names=names)
    senders.check(conn, account, broadcast_id)  # InvalidInput: a From it may not use
    return schedule_result(_row(conn, "broadcast_schedule", {
        "account": account, "id": broadcast_id, "at": start, "not_after": latest,
        "details": json.dumps(details or {})}))


def unschedule(conn: psycopg.Connection[Any], account: str, broadcast_id: uuid.UUID,
               details: dict[str, Any] | None = None) -> dict[str, Any]:
    """scheduled -> draft; raises NotFound."""
    return unschedule_result(_row(conn, "broadcast_unschedule", {
        "account": account, "id": broadcast_id, "details": json.dumps(details or {})}))


def retry(conn: psycopg.Connection[Any], account: str, broadcast_id: uuid.UUID,
          include_unknown: bool = False, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Failed (and, when asked, unknown) recipients of a finished broadcast back to pending."""
    return retry_result(_row(conn, "broadcast_retry", {
        "account": account, "id": broadcast_id, "include_unknown": include_unknown,
        "in_doubt": in_doubt_seconds(), "details": json.dumps(details or {})}), include_unknown)


def copy(conn: psycopg.Connection[Any], account: str, broadcast_id: uuid.UUID,
         details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A new draft with the same content and segment; raises NotFound."""
    return _row(conn, "broadcast_copy", {"account": account, "id": broadcast_id,
                                         "details": json.dumps(details or {})})
