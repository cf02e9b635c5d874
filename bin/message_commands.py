"""`pgcast message send|status` and `pgcast rate messages-share F`: transactional messages
(issue 26) from the command line, through the same function applications call in SQL."""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

import psycopg

from pgcast.bin import output
from pgcast.mail import errors as mail_errors
from pgcast.mail import transactional, validate
from pgcast.sql import db, errors
from pgcast.sql.queries import QUERIES


def cmd_message(args: argparse.Namespace) -> int:
    """Run `message send` or `message status`."""
    with db.connect(autocommit=True) as conn:
        if args.action == "status":
            try:
                mid = uuid.UUID(args.id)
            except ValueError:
                raise errors.InvalidInput(f"{args.id!r} is not a message id") from None
            row = conn.execute(QUERIES["message_get"] if args.account else
                               QUERIES["message_get_any"],
                               {"id": mid, "account": args.account}).fetchone()
            if row is None:
                raise errors.NotFound(f"no message {mid}")
            output.emit(dict(row))
            return 0
        return _send(conn, args)


def _send(conn: psycopg.Connection[Any], args: argparse.Namespace) -> int:
    account = args.account or output.ACCOUNT_DEFAULT
    text = output.read_file(args.text) if args.text else None
    html = output.read_file(args.html) if args.html else None
    if text is None and html is None:
        raise errors.InvalidInput("--text FILE or --html FILE is required")
    try:
        to = validate.address(args.to, "--to")
        validate.sender(args.from_address, "--from")
        category = transactional.category(args.category)
    except mail_errors.InvalidValue as exc:
        raise errors.InvalidInput(str(exc)) from None
    try:
        row = conn.execute(QUERIES["message_send"], {
            "account": account, "to": to, "subject": args.subject, "text": text,
            "html": html, "from": args.from_address, "key": args.key, "category": category,
            "reply_to": None, "headers": json.dumps({}), "tags": json.dumps({}),
            "notify": True}).fetchone()
    except psycopg.errors.InvalidParameterValue as exc:
        raise errors.InvalidInput(exc.diag.message_primary or str(exc)) from None
    assert row is not None
    output.emit({"id": str(row["id"]), "status": row["status"], "created": row["created"]})
    return 0


def cmd_messages_share(args: argparse.Namespace) -> int:
    """`pgcast rate messages-share F`."""
    with db.connect(autocommit=True) as conn:
        try:
            row = conn.execute(QUERIES["messages_share"], {"name": "global",
                                                           "share": args.share}).fetchone()
        except psycopg.errors.InvalidParameterValue as exc:
            raise errors.InvalidInput(exc.diag.message_primary or str(exc)) from None
    if row is None:
        raise errors.NotFound("no global bucket: run `pgcast migrate`")
    output.emit(dict(row))
    return 0


def _share(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not 0 < value <= 1:
        # 0 would hold messages back for as long as broadcasts wait for tokens
        raise argparse.ArgumentTypeError("must be more than 0 and at most 1 (0 would hold "
                                         "messages back for as long as broadcasts wait)")
    return value


def register(sub: Any, rsub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add `pgcast message` and `pgcast rate messages-share`."""
    m = sub.add_parser("message", help="transactional messages: one email to one address")
    msub = m.add_subparsers(dest="action", required=True, parser_class=parser_class)
    ms = msub.add_parser("send", help="queue one message (a running worker sends it)")
    ms.add_argument("--to", required=True, help="the recipient's address")
    ms.add_argument("--subject", required=True, help="the subject (one line)")
    ms.add_argument("--text", metavar="FILE", help="plain-text body from FILE")
    ms.add_argument("--html", metavar="FILE", help="HTML body from FILE")
    ms.add_argument("--from", dest="from_address", required=True,
                    help="`addr@example.com` or `Name <addr@example.com>`")
    ms.add_argument("--key", help="idempotency key: the same key again gives the first "
                                  "message, never a second send")
    ms.add_argument("--category", choices=transactional.CATEGORIES,
                    help="transactional (default) and confirmation go to unsubscribed "
                         "contacts; marketing does not")
    ms.add_argument("--account", help=f"the account (default {output.ACCOUNT_DEFAULT})")
    st = msub.add_parser("status", help="a message's status, attempts, error, times, feedback")
    st.add_argument("id", help="the message id")
    st.add_argument("--account", help="only in this account (default: any account)")
    m.set_defaults(func=cmd_message)
    share = rsub.add_parser("messages-share", help="the share of the global rate messages may "
                                                   "take while broadcasts wait (default 0.5)")
    share.add_argument("share", type=_share, metavar="F",
                       help="a fraction, more than 0 and at most 1")
    share.set_defaults(func=cmd_messages_share)
