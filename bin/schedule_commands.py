"""`pgcast broadcast schedule|unschedule|retry|copy`: scheduled sends, retries and copies."""

from __future__ import annotations

import argparse
from typing import Any

from pgcast.bin import broadcast_commands, output
from pgcast.sql import db, schedule


def cmd_schedule(args: argparse.Namespace) -> int:
    """Run one of the schedule, unschedule, retry and copy commands."""
    who = output.actor(args.actor)
    with db.connect(autocommit=True) as conn:
        bid = broadcast_commands.resolve_id(conn, args.account, args.id)
        if args.action == "copy":
            row = schedule.copy(conn, args.account, bid, who)
            print(row["id"])
            return 0
        if args.action == "schedule":
            result = schedule.schedule(conn, args.account, bid, args.at, args.not_after, who,
                                       names=schedule.CLI_NAMES)
        elif args.action == "unschedule":
            result = schedule.unschedule(conn, args.account, bid, who)
        else:
            result = schedule.retry(conn, args.account, bid, args.include_unknown, who)
    output.emit(result)  # ISO 8601 times, as every command
    return 0 if result["success"] else 1


def register(bsub: Any, account_default: str) -> None:
    """Add schedule, unschedule, retry and copy to `pgcast broadcast`."""
    s = bsub.add_parser("schedule", help="start a draft at a given time")
    s.add_argument("--at", required=True, metavar="TIME",
                   help="ISO 8601 with an offset, e.g. 2026-12-24T09:00:00+01:00")
    s.add_argument("--not-after", metavar="TIME",
                   help="latest start: later than this, the broadcast fails (missed_window)")
    u = bsub.add_parser("unschedule", help="take a scheduled broadcast back to draft")
    r = bsub.add_parser("retry", help="send again to the recipients a finished broadcast failed")
    r.add_argument("--include-unknown", action="store_true",
                   help="also recipients whose outcome is unknown (they may have got it), "
                        "except those handed off less than the lease plus the provider's "
                        "timeout ago (65 s by default): their call may still be answered")
    c = bsub.add_parser("copy", help="a new draft with the same content and segment")
    for sp in (s, u, r, c):
        sp.add_argument("id", help="the broadcast's id, or a unique prefix of 8+ characters")
        sp.add_argument("--account", default=account_default, help="the account (tenant)")
        sp.add_argument("--actor", metavar="NAME",
                        help="who is doing this, for the audit log (default: the OS user)")
        sp.set_defaults(func=cmd_schedule)
