"""`pgcast broadcast recipients`, ids by prefix, and the listing and progress shapes."""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from typing import Any

import psycopg

from pgcast.api import openapi
from pgcast.api import progress as api_progress
from pgcast.bin import output
from pgcast.sql import broadcasts, db, errors
from pgcast.sql.queries import QUERIES

MIN_PREFIX = 8  # characters of an id prefix: fewer would often be ambiguous
_PREFIX = re.compile(r"^[0-9a-f-]+$")
LIST_COLUMNS = ("id", "status", "sent", "total", "created_at", "scheduled_at", "subject")
RECIPIENT_COLUMNS = ("email", "status", "attempts", "last_error", "sent_at")
PAGE = 1000  # recipient rows read per statement


def resolve_id(conn: psycopg.Connection[Any], account: str | None, raw: str) -> uuid.UUID:
    """A broadcast id from a whole id or a unique prefix of at least 8 characters (account
    None: among every account's broadcasts)."""
    text = str(raw).strip().lower()
    try:
        return uuid.UUID(text)
    except ValueError:
        pass
    if len(text) < MIN_PREFIX or not _PREFIX.match(text):
        raise errors.InvalidInput(
            f"not a broadcast id: {raw!r} (give the id or its first {MIN_PREFIX}+ characters)")
    found = [r["id"] for r in conn.execute(QUERIES["broadcast_id_prefix"],
                                           {"account": account, "prefix": text})]
    if not found:
        raise errors.NotFound(f"no broadcast whose id starts with {text}")
    if len(found) > 1:
        raise errors.InvalidInput(f"{text} is the start of several broadcast ids; give more")
    return uuid.UUID(str(found[0]))


def progress(conn: psycopg.Connection[Any], account: str, bid: uuid.UUID) -> dict[str, Any]:
    """The API's progress shape (status, counts, rate, eta_seconds); raises NotFound."""
    row = conn.execute(QUERIES["api_progress"], {"account": account, "id": bid}).fetchone()
    if row is None:
        raise errors.NotFound(f"no broadcast {bid}")
    return api_progress.progress_json(dict(row))


def print_list(conn: psycopg.Connection[Any], args: argparse.Namespace) -> None:
    """`broadcast list`: a table on a terminal, JSON otherwise."""
    rows = broadcasts.list_page(conn, args.account, limit=args.limit)
    output.listing(rows, LIST_COLUMNS, as_json=output.wants_json(args.json))


def cmd_recipients(args: argparse.Namespace) -> int:
    """A broadcast's recipient rows by contact id, optionally of one status."""
    with db.connect(autocommit=True) as conn:
        bid = resolve_id(conn, args.account, args.id)
        broadcasts.get(conn, args.account, bid)  # NotFound for another account's id
        rows: list[dict[str, Any]] = []
        after, want = args.after, args.limit + 1 if args.limit else 0
        while not want or len(rows) < want:
            size = PAGE if not want else min(PAGE, want - len(rows))
            page = [dict(r) for r in conn.execute(QUERIES["recipients_page"], {
                "account": args.account, "id": bid, "status": args.status, "after": after,
                "limit": size})]
            rows += page
            if len(page) < size:
                break
            after = page[-1]["contact_id"]
    more = bool(args.limit) and len(rows) > args.limit
    rows = rows[: args.limit] if args.limit else rows
    output.listing(rows, RECIPIENT_COLUMNS, as_json=output.wants_json(args.json))
    if more:
        print(f"more: --after {rows[-1]['contact_id']}", file=sys.stderr)
    return 0


def register(bsub: Any) -> list[argparse.ArgumentParser]:
    """Add `broadcast recipients`; return its parser (the caller adds --account)."""
    r = bsub.add_parser("recipients", help="a broadcast's recipients and their outcome")
    r.add_argument("id", help="the broadcast id, or a unique prefix of 8+ characters")
    r.add_argument("--status", choices=openapi.RECIPIENT_STATUSES,
                   help="only recipients in this status (e.g. failed, unknown)")
    r.add_argument("--limit", type=int, default=100, help="at most N rows (default 100; 0 = all)")
    r.add_argument("--after", type=int, default=0, metavar="CONTACT_ID",
                   help="start after this contact id (the cursor a longer list prints)")
    r.add_argument("--json", action="store_true", help="JSON even on a terminal")
    r.set_defaults(func=cmd_recipients)
    return [r]
