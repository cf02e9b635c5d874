"""Unknown recipients with no SES event after PGCAST_RECONCILE_AFTER: put back to pending once
(never twice), by the sweeper or `pgcast reconcile`. Events resolve the others as they come
(pgcast_ses_event_v2, through the API's SNS webhook)."""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from typing import Any

import psycopg

from pgcast.sql.queries import QUERIES
from pgcast.worker import errors

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}  # seconds per unit
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_after(raw: str) -> float:
    """Seconds from `15m`, `900`, `900s`, `1.5h` or `1d`; raises ConfigError."""
    match = _DURATION.match(raw)
    seconds = float(match.group(1)) * UNITS[match.group(2) or "s"] if match else math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise errors.ConfigError(f"PGCAST_RECONCILE_AFTER must be a duration such as 15m or "
                                 f"900s, more than zero, not {raw!r}")
    return seconds


def after_from_env() -> float | None:
    """PGCAST_RECONCILE_AFTER in seconds; None when unset (no requeue for want of an event)."""
    raw = os.environ.get("PGCAST_RECONCILE_AFTER", "").strip()
    return parse_after(raw) if raw else None


def _params(bid: Any, after: float, dry_run: bool, via: dict[str, Any]) -> dict[str, Any]:
    return {"id": bid, "after": f"{after} seconds", "dry_run": dry_run,
            "details": json.dumps(via)}


def requeue(conn: psycopg.Connection[Any], after: float, bid: uuid.UUID | None = None,
            dry_run: bool = False, via: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One transaction per broadcast (autocommit `conn`): what was (or would be) requeued."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    ids = [r["id"] for r in cur.execute(QUERIES["reconcile_candidates"],
                                        {"id": bid, "after": f"{after} seconds"})]
    out: list[dict[str, Any]] = []
    for one in ids:
        out.extend(dict(r) for r in cur.execute(QUERIES["reconcile_requeue"], _params(
            one, after, dry_run, via or {"via": "sweeper"})))
    return [r for r in out if r["requeued"]]


async def requeue_async(conn: psycopg.AsyncConnection[Any],
                        after: float) -> list[dict[str, Any]]:
    """requeue() for the sweeper, on an asynchronous autocommit connection."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    await cur.execute(QUERIES["reconcile_candidates"], {"id": None, "after": f"{after} seconds"})
    ids = [r["id"] for r in await cur.fetchall()]
    out: list[dict[str, Any]] = []
    for one in ids:
        await cur.execute(QUERIES["reconcile_requeue"],
                          _params(one, after, False, {"via": "sweeper"}))
        out.extend(dict(r) for r in await cur.fetchall())
    return [r for r in out if r["requeued"]]
