"""Retention: finished broadcasts older than a cutoff leave the live recipient table for the
archive (their partition detached CONCURRENTLY, copied to broadcast_recipients_archive, dropped)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql as psql

from pgcast.sql import errors, tracking
from pgcast.sql.queries import QUERIES

log = logging.getLogger("pgcast.retention")

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(min|mo|[smhdwM]?)\s*$")
_UNIT = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "": 86400.0,
         "w": 7 * 86400.0, "mo": 30 * 86400.0, "M": 30 * 86400.0}  # seconds; bare = days
AGE_HELP = ("90d, 12h, 30min (or 30m), 45s, 2w, 3mo (or 3M: months of 30 days); "
            "a bare number is days")


def parse_age(text: str) -> float:
    """`90d`, `12h`, `30min`/`30m`, `45s`, `2w`, `3mo`/`3M` (30-day months) or a bare number
    of days, in seconds; InvalidInput otherwise."""
    m = _AGE.match(text)
    if not m:
        raise errors.InvalidInput(f"--older-than must be a number and a unit, {AGE_HELP}: "
                                  f"{text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def minutes_note(text: str) -> str | None:
    """A note when an age says `m`, which is minutes here (as in systemd and cron tools) but
    reads as months to some: the spelling that says which, for scripts and cron mail."""
    m = _AGE.match(text)
    if not m or m.group(2) != "m":
        return None
    n = m.group(1)
    return (f"pgcast: --older-than {text.strip()} means minutes (write {n}min to say so; "
            f"months are {n}mo)")


@dataclass
class Report:
    """What one retention run did (or, dry, would do)."""

    dry_run: bool
    broadcasts: int = 0
    recipients: int = 0
    seconds: float = 0.0
    ids: list[uuid.UUID] = field(default_factory=list)
    tracking_months: int = 0  # months of opens and clicks dropped (not counted when dry)

    def summary(self) -> dict[str, Any]:
        """The JSON the command prints."""
        return {"dry_run": self.dry_run, "broadcasts": self.broadcasts,
                "recipients": self.recipients, "tracking_months": self.tracking_months,
                "seconds": round(self.seconds, 3)}


def candidates(conn: psycopg.Connection[Any], older_than: float) -> list[dict[str, Any]]:
    """Finished broadcasts due for the archive, oldest first."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(QUERIES["retention_candidates"], {"older_than": older_than}).fetchall()


def archive_one(conn: psycopg.Connection[Any], bid: uuid.UUID) -> int | None:
    """Detach one broadcast's partition and archive it; rows archived, None if nothing done.

    `conn` must be in autocommit: DETACH ... CONCURRENTLY runs two transactions of its own.
    A run interrupted anywhere is finished by the next: a half-detached partition is
    finalized, a detached one archived.
    """
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    part = cur.execute(QUERIES["retention_partition"], {"id": bid}).fetchone()
    if part is None:
        return None
    # decided under the broadcast's row lock, which a retry takes too: from here on a retry
    # refuses it, so no row goes back to pending behind the detach
    begun = cur.execute(QUERIES["retention_archive_begin"], {"id": bid}).fetchone()
    if part["attached"] and not part["detach_pending"] and not (begun and begun["begun"]):
        return None  # retried (sending again) since it was listed: it stays live
    name = psql.Identifier(part["schema"], part["name"])
    if part["detach_pending"]:
        conn.execute(psql.SQL(QUERIES["retention_detach_finalize"]).format(partition=name))
    elif part["attached"]:
        conn.execute(psql.SQL(QUERIES["retention_detach"]).format(partition=name))
    row = cur.execute(QUERIES["retention_archive"], {"id": bid}).fetchone()
    return None if row is None or row["archived"] is None else int(row["archived"])


def run(conn: psycopg.Connection[Any], older_than: float, *, dry_run: bool = False,
        stop: Callable[[], bool] = lambda: False) -> Report:
    """Archive every broadcast finished more than `older_than` seconds ago, one at a time
    (short transactions; `stop()` is asked between broadcasts)."""
    report = Report(dry_run)
    t0 = time.perf_counter()
    for b in candidates(conn, older_than):
        if stop():
            break
        if dry_run:
            n: int | None = int(b["total"])
        else:
            n = archive_one(conn, b["id"])
        if n is not None:
            report.broadcasts += 1
            report.recipients += n
            report.ids.append(b["id"])
            if not dry_run:
                log.info("archived broadcast %s: %d recipients", b["id"], n)
    if not dry_run and not stop():
        # opens and clicks: whole months older than the cutoff, and archived broadcasts'
        # per-person firsts (sql/tracking.py)
        report.tracking_months = tracking.retention(conn, older_than)
    report.seconds = time.perf_counter() - t0
    return report


def lookup(conn: psycopg.Connection[Any], bid: uuid.UUID, email: str) -> list[dict[str, Any]]:
    """Was `email` a recipient of broadcast `bid`: its row, live or archived ([] if not)."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(QUERIES["recipient_lookup"], {"id": bid, "email": email}).fetchall()
