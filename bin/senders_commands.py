"""`pgcast senders add|list|remove`: the From addresses and domains an account may use.

Operator only (there is no tenant route). An account with no senders may use any From; with
some, a broadcast's From must be one of them (an address) or at one of them (a domain) to be
sent, scheduled or test-sent.
"""

from __future__ import annotations

import argparse
from typing import Any

from pgcast.bin import output
from pgcast.sql import db, senders
from pgcast.sql.queries import QUERIES


def cmd_senders(args: argparse.Namespace) -> int:
    """Run `senders add`, `senders remove` or `senders list`."""
    with db.connect(autocommit=True) as conn:
        if args.action == "list":
            rows = conn.execute(QUERIES["senders_list"],
                                {"account": args.sender_account}).fetchall()
            output.emit({"senders": [dict(r) for r in rows]})
            return 0
        sender = senders.normalize(args.sender)
        params = {"account": args.sender_account, "sender": sender}
        if args.action == "add":
            row = conn.execute(QUERIES["senders_add"], params).fetchone()
            output.emit({"account": args.sender_account, "sender": sender,
                         "added": row is not None})
            return 0
        row = conn.execute(QUERIES["senders_remove"], params).fetchone()
        output.emit({"account": args.sender_account, "sender": sender,
                     "removed": row is not None})
        return 0 if row is not None else 1


def register(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add `pgcast senders` and its subcommands."""
    s = sub.add_parser("senders", help="the From addresses and domains an account may use "
                                       "(operator only; none: any From)")
    ssub = s.add_subparsers(dest="action", required=True, parser_class=parser_class)
    for name, text in (("add", "allow an account to send as an address or from a domain"),
                       ("remove", "stop allowing an address or a domain")):
        sp = ssub.add_parser(name, help=text)
        sp.add_argument("sender_account", metavar="ACCOUNT", help="the account")
        sp.add_argument("sender", metavar="DOMAIN_OR_ADDRESS",
                        help="news@example.com (that address) or example.com (any address "
                             "at that domain, not its subdomains)")
    sl = ssub.add_parser("list", help="the senders of one account, or of every account")
    sl.add_argument("sender_account", metavar="ACCOUNT", nargs="?", help="default: every account")
    s.set_defaults(func=cmd_senders)
