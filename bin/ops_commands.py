"""`pgcast retention` (archive finished broadcasts older than a cutoff) and `pgcast lookup`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pgcast.bin import broadcast_commands, logs, output
from pgcast.sql import db, errors, retention

DEFAULT_AGE = "90d"


def cmd_retention(args: argparse.Namespace) -> int:
    """Archive (or, with --dry-run, list the count of) broadcasts older than --older-than."""
    older_than = retention.parse_age(args.older_than)
    note = retention.minutes_note(args.older_than)
    if note:
        print(note, file=sys.stderr)
    try:
        logs.configure(os.environ.get("PGCAST_LOG_LEVEL", "WARNING"))
    except ValueError as exc:
        raise errors.InvalidInput(str(exc)) from None
    with db.connect(autocommit=True) as conn:
        report = retention.run(conn, older_than, dry_run=args.dry_run)
    print(json.dumps(report.summary()))
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    """Print the recipient row of an address in a broadcast, live or archived; exit 1 if none."""
    with db.connect() as conn:
        # an operator's command: the id or its prefix among every account's broadcasts
        bid = broadcast_commands.resolve_id(conn, None, args.broadcast)
        rows = retention.lookup(conn, bid, args.email)
    for row in rows:
        output.emit(row)  # ISO 8601 times, as every command
    return 0 if rows else 1


def register(sub: Any) -> None:
    """Add `retention` and `lookup` to the pgcast command line."""
    r = sub.add_parser("retention", help="move finished broadcasts' recipients to the archive")
    r.add_argument("--older-than", default=DEFAULT_AGE, metavar="AGE",
                   help=f"finished more than AGE ago: {retention.AGE_HELP} (default "
                        f"{DEFAULT_AGE})")
    r.add_argument("--dry-run", action="store_true",
                   help="count what would be archived; change nothing")
    r.set_defaults(func=cmd_retention)

    lk = sub.add_parser("lookup", help="was this address a recipient of a broadcast (live or "
                        "archived): status, sent_at, provider_message_id")
    lk.add_argument("broadcast", help="the broadcast id, or a unique prefix of 8+ characters")
    lk.add_argument("email", help="the address to look for")
    lk.set_defaults(func=cmd_lookup)
