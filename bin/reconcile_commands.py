"""`pgcast reconcile [BROADCAST] [--dry-run]`: unknown recipients, open and resolved, and the
requeue of those with no SES event after PGCAST_RECONCILE_AFTER (once, never twice)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pgcast.bin import broadcast_commands, output
from pgcast.sql import db
from pgcast.sql.queries import QUERIES
from pgcast.worker import reconcile


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Requeue (or, with --dry-run, count) what has waited too long; print each broadcast."""
    after = reconcile.parse_after(args.after) if args.after else reconcile.after_from_env()
    with db.connect(autocommit=True) as conn:
        bid = broadcast_commands.resolve_id(conn, args.account, args.id) if args.id else None
        changed: dict[Any, int] = {}
        if after is not None:
            for row in reconcile.requeue(conn, after, bid, args.dry_run, output.actor(args.actor)):
                changed[row["broadcast_id"]] = int(row["requeued"])
        ids = [bid] if bid is not None else list(changed)
        for one in ids:
            counts = conn.execute(QUERIES["reconcile_counts"], {"id": one}).fetchone()
            if counts is None:
                continue
            c = dict(counts) if isinstance(counts, dict) else dict(zip(
                ("id", "status", "open", "resolved", "requeued"), counts, strict=True))
            print(json.dumps({"broadcast": str(one), "status": c["status"],
                              "unknown_open": c["open"], "unknown_resolved": c["resolved"],
                              "unknown_requeued": c["requeued"],
                              "would_requeue" if args.dry_run else "requeued_now":
                                  changed.get(one, 0),
                              "after_seconds": after}))
    return 0


def register(sub: Any, account_default: str) -> None:
    """Add `pgcast reconcile`."""
    r = sub.add_parser("reconcile", help="requeue unknown recipients that got no SES event in "
                                         "time (once); show unknown open vs resolved")
    r.add_argument("id", nargs="?", help="one broadcast (id or a unique prefix of 8+ "
                                         "characters); default: every broadcast it concerns")
    r.add_argument("--dry-run", action="store_true", help="count what would be requeued")
    r.add_argument("--after", metavar="DURATION",
                   help="e.g. 15m (default PGCAST_RECONCILE_AFTER; unset: only show the counts)")
    r.add_argument("--account", default=account_default, help="the account (tenant)")
    r.add_argument("--actor", metavar="NAME",
                   help="who is doing this, for the audit log (default: the OS user)")
    r.set_defaults(func=cmd_reconcile)
