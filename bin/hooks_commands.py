"""`pgcast webhooks add|list|remove|rotate-secret|enable|deliveries|redeliver` (issue 30)."""

from __future__ import annotations

import argparse
import getpass
import socket
import uuid
from typing import Any

from pgcast.bin import output
from pgcast.sql import db, errors, hooks
from pgcast.sql.queries import QUERIES


def _id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise errors.NotFound(f"no webhook endpoint {raw!r}") from None


def _actor() -> dict[str, str]:
    return {"via": "cli", "user": getpass.getuser(), "host": socket.gethostname()}


def cmd_webhooks(args: argparse.Namespace) -> int:
    """Run one `pgcast webhooks` subcommand."""
    with db.connect(autocommit=True) as conn:
        if args.action == "add":
            wanted = [e.strip() for raw in args.events for e in raw.split(",") if e.strip()]
            output.emit(hooks.add(conn, args.account, args.url, wanted, _actor()))
            return 0
        if args.action == "list":
            rows = conn.execute(QUERIES["hooks_list"], {"account": args.account}).fetchall()
            output.emit({"webhooks": [dict(r) for r in rows]})
            return 0
        params: dict[str, Any] = {"account": args.account, "id": _id(args.id)}
        if args.action == "remove":
            row = conn.execute(QUERIES["hooks_remove"], params).fetchone()
        elif args.action == "rotate-secret":
            secret = hooks.new_secret()
            row = conn.execute(QUERIES["hooks_rotate"], {
                **params, "secret": secret, "actor": output.dumps(_actor())}).fetchone()
            if row is not None:
                row = {**row, "secret": secret}
        elif args.action == "enable":
            row = conn.execute(QUERIES["hooks_enable"], {
                **params, "actor": output.dumps(_actor())}).fetchone()
        elif args.action == "redeliver":
            row = conn.execute(QUERIES["hooks_redeliver"], {
                **params, "delivery": args.delivery}).fetchone()
        else:  # deliveries
            if conn.execute(QUERIES["hooks_one"], params).fetchone() is None:
                raise errors.NotFound(f"no webhook endpoint {args.id} in account {args.account}")
            rows = conn.execute(QUERIES["hooks_deliveries"], {
                **params, "before": 0, "limit": args.limit}).fetchall()
            output.emit({"deliveries": [dict(r) for r in rows]})
            return 0
        if row is None:
            raise errors.NotFound(f"no webhook endpoint {args.id} in account {args.account}"
                                  if args.action != "redeliver" else
                                  f"no delivery {args.delivery} of endpoint {args.id}")
        output.emit(dict(row))
        return 0


def register(sub: Any, parser_class: type[argparse.ArgumentParser], account_default: str) -> None:
    """Add `pgcast webhooks` and its subcommands."""
    w = sub.add_parser("webhooks", help="signed event webhooks to your application "
                                        "(docs/webhooks.md)")
    wsub = w.add_subparsers(dest="action", required=True, parser_class=parser_class)
    add = wsub.add_parser("add", help="add an endpoint; prints its secret (shown once)")
    add.add_argument("url", help="the receiver's https URL")
    add.add_argument("--events", nargs="+", required=True, metavar="TYPE",
                     help="event types (space or comma separated), or * for all: "
                          + ", ".join(hooks.EVENT_TYPES))
    parsers = [add, wsub.add_parser("list", help="the account's endpoints (never secrets)")]
    for name, text in (("remove", "remove an endpoint and its deliveries"),
                       ("rotate-secret", "a new signing secret, printed once"),
                       ("enable", "deliver to a disabled endpoint again"),
                       ("deliveries", "the endpoint's delivery log, newest first"),
                       ("redeliver", "deliver one delivery's event again")):
        sp = wsub.add_parser(name, help=text)
        sp.add_argument("id", help="the endpoint's id")
        if name == "deliveries":
            sp.add_argument("--limit", type=int, default=50,
                            help="at most N deliveries (default 50)")
        if name == "redeliver":
            sp.add_argument("delivery", type=int, help="the delivery's id (from `deliveries`)")
        parsers.append(sp)
    for sp in parsers:
        sp.add_argument("--account", default=account_default,
                        help=f"the account (tenant) to act on (default {account_default})")
    w.set_defaults(func=cmd_webhooks)
