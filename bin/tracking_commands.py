"""`pgcast broadcast stats`, `broadcast create --track` and `pgcast tracking default`.

The account default is operator only (no tenant route): which mode an account's new
broadcasts get when they do not say.
"""

from __future__ import annotations

import argparse
from typing import Any

from pgcast.bin import broadcast_commands, output
from pgcast.sql import db, tracking
from pgcast.sql.queries import QUERIES


def add_track_flag(parser: argparse.ArgumentParser) -> None:
    """`--track MODE` on `broadcast create`."""
    parser.add_argument("--track", choices=tracking.MODES, metavar="MODE",
                        help="opens and clicks: none, aggregate (counts only) or contact "
                             "(per person); default: the account's default, else none")


def cmd_stats(args: argparse.Namespace) -> int:
    """Run `broadcast stats ID`."""
    with db.connect(autocommit=True) as conn:
        bid = broadcast_commands.resolve_id(conn, args.account, args.id)
        output.emit(tracking.stats(conn, args.account, bid))
    return 0


def cmd_tracking(args: argparse.Namespace) -> int:
    """Run `tracking default ACCOUNT [MODE]`."""
    with db.connect(autocommit=True) as conn:
        if args.mode is None:
            row = conn.execute(QUERIES["tracking_default_get"],
                               {"account": args.tracking_account}).fetchone()
            assert row is not None
            output.emit(dict(row))
            return 0
        output.emit(tracking.set_default(conn, args.tracking_account, args.mode))
    return 0


def register_broadcast(bsub: Any) -> list[argparse.ArgumentParser]:
    """Add `broadcast stats`; return its parser (the caller adds --account)."""
    s = bsub.add_parser("stats", help="sent, delivered, bounced, complained, unsubscribed, "
                                      "opens and clicks (human and machine), per link")
    s.add_argument("id", help="the broadcast id, or a unique prefix of 8+ characters")
    s.set_defaults(func=cmd_stats)
    return [s]


def register(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add `pgcast tracking default`."""
    t = sub.add_parser("tracking", help="open and click tracking (operator only)")
    tsub = t.add_subparsers(dest="action", required=True, parser_class=parser_class)
    d = tsub.add_parser("default", help="the tracking mode an account's new broadcasts get "
                                        "unless they say (built in: none)")
    d.add_argument("tracking_account", metavar="ACCOUNT", help="the account")
    d.add_argument("mode", nargs="?", choices=tracking.MODES, metavar="MODE",
                   help="none, aggregate or contact (omitted: print the current one)")
    t.set_defaults(func=cmd_tracking)
