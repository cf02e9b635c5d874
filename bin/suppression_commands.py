"""`pgcast contacts suppressed` and `pgcast contacts unsuppress` (SES feedback, issue 14)."""

from __future__ import annotations

import argparse
import getpass
import json
import socket
from typing import Any

from pgcast.sql import db, feedback


def cmd_suppressed(args: argparse.Namespace) -> int:
    """Print the account's suppressed contacts, one JSON object per line, by contact id."""
    why = feedback.reason(args.reason)
    after = 0
    with db.connect() as conn:
        while True:
            rows = feedback.page(conn, args.account, why, after, feedback.PAGE)
            for r in rows:
                print(json.dumps(feedback.item(r), default=str))
            if len(rows) < feedback.PAGE:
                return 0
            after = rows[-1]["id"]


def cmd_unsuppress(args: argparse.Namespace) -> int:
    """Lift one suppression; exit 1 when the contact was not suppressed."""
    actor = {"via": "cli", "user": getpass.getuser(), "host": socket.gethostname()}
    with db.connect(autocommit=True) as conn:
        result = feedback.unsuppress(conn, args.account, args.email.strip(), "cli", actor)
    print(json.dumps(result))
    return 0 if result["success"] else 1


def register(csub: Any, account_default: str) -> None:
    """Add `suppressed` and `unsuppress` under `pgcast contacts`."""
    s = csub.add_parser("suppressed", help="list suppressed contacts (JSON lines)")
    s.add_argument("--reason", choices=feedback.REASONS, help="only this reason")
    s.set_defaults(func=cmd_suppressed)
    u = csub.add_parser("unsuppress", help="lift one contact's suppression (audited)")
    u.add_argument("email", help="the contact's address")
    u.set_defaults(func=cmd_unsuppress)
    for sp in (s, u):
        sp.add_argument("--account", default=account_default,
                        help=f"the account (tenant) to act on (default {account_default})")
