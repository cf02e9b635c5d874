"""Suppressed contacts: the list and unsuppress, shared by the CLI and the API."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from pgcast.sql import errors
from pgcast.sql.queries import QUERIES

REASONS = ("bounce", "soft_bounce", "complaint")
PAGE = 1000  # contacts per query when the CLI lists them all


def reason(raw: Any) -> str | None:
    """A suppression reason filter (None: every reason); raises InvalidInput."""
    if raw is None:
        return None
    if raw not in REASONS:
        raise errors.InvalidInput(f"reason must be one of {', '.join(REASONS)}: {str(raw)[:40]!r}")
    return str(raw)


def item(row: dict[str, Any]) -> dict[str, Any]:
    """One suppressed contact as the CLI and the API show it."""
    return {"email": row["email"], "reason": row["suppressed_reason"],
            "detail": row["suppressed_detail"], "suppressed_at": row["suppressed_at"],
            "soft_bounces": row["soft_bounces"], "unsubscribed_at": row["unsubscribed_at"]}


def page(conn: psycopg.Connection[Any], account: str, why: str | None, after: int,
         limit: int) -> list[dict[str, Any]]:
    """A page of an account's suppressed contacts after contact id `after`."""
    rows = conn.execute(QUERIES["feedback_suppressed_page"], {
        "account": account, "reason": why, "after": after, "limit": limit}).fetchall()
    return [dict(r) for r in rows]


def unsuppress_result(row: dict[str, Any] | None, account: str, email: str) -> dict[str, Any]:
    """The answer to an unsuppress from a pgcast_unsuppress_v1 row; raises NotFound."""
    if row is None:
        raise errors.NotFound(f"no contact {email} in account {account}")
    if not row["ok"]:
        return {"success": False, "email": row["email"], "message": "not suppressed"}
    return {"success": True, "email": row["email"], "was": row["was"],
            "message": f"suppression ({row['was']}) lifted"}


def unsuppress(conn: psycopg.Connection[Any], account: str, email: str, source: str,
               actor: dict[str, Any]) -> dict[str, Any]:
    """Lift one contact's suppression, audited in contact_events; raises NotFound."""
    row = conn.execute(QUERIES["feedback_unsuppress"], {
        "account": account, "email": email, "source": source,
        "actor": json.dumps(actor)}).fetchone()
    return unsuppress_result(dict(row) if row is not None else None, account, email)
