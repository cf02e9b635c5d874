"""Starts due scheduled broadcasts: part of every sweep (the sweeper task and --once)."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgcast.sql import broadcasts
from pgcast.sql.queries import QUERIES

log = logging.getLogger("pgcast.starter")

MAX_PER_SWEEP = 1000  # broadcasts started by one sweep; the next sweep takes the rest


def _log(row: dict[str, Any]) -> None:
    if row["reason"]:
        log.warning("scheduled broadcast %s not started: %s (%.1fs after its time)",
                    row["broadcast_id"], row["reason"], row["lateness_seconds"])
    else:
        log.info("scheduled broadcast %s started: %s recipients, %.1fs after its time",
                 row["broadcast_id"], row["queued"], row["lateness_seconds"])


def start_due(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Start every due scheduled broadcast, one per transaction (autocommit connection)."""
    started: list[dict[str, Any]] = []
    cur = conn.cursor(row_factory=dict_row)
    while len(started) < MAX_PER_SWEEP:
        row = cur.execute(QUERIES["start_due"]).fetchone()
        if row is None:
            break
        started.append(dict(row))
        _log(started[-1])
        if row["reason"] is None and row["queued"] >= broadcasts.ANALYZE_AFTER:
            cur.execute(QUERIES["analyze_recipients"], {"id": row["broadcast_id"]})
    return started


async def start_due_async(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """start_due on an async autocommit connection (the procrastinate task)."""
    started: list[dict[str, Any]] = []
    cur = conn.cursor(row_factory=dict_row)
    while len(started) < MAX_PER_SWEEP:
        await cur.execute(QUERIES["start_due"])
        row = await cur.fetchone()
        if row is None:
            break
        started.append(dict(row))
        _log(started[-1])
        if row["reason"] is None and row["queued"] >= broadcasts.ANALYZE_AFTER:
            await cur.execute(QUERIES["analyze_recipients"], {"id": row["broadcast_id"]})
    return started
