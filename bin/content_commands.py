"""`pgcast broadcast preview` and `pgcast broadcast test`: see a message, send it to yourself."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import psycopg

from pgcast.bin import broadcast_commands
from pgcast.mail import errors as mail_errors
from pgcast.mail import message, preview, unsubscribe, validate
from pgcast.sql import db, errors, jobs
from pgcast.sql import senders as sender_rule
from pgcast.sql.queries import QUERIES

MAX_TO = 5  # addresses in one test send (as the API)
HOURLY_CAP = 50  # test messages per account per hour (as the API)
POLL = 0.2  # seconds between looks at a test send's outcome
DEFAULT_TIMEOUT = 60.0  # seconds


def _emit(payload: Any) -> None:
    print(json.dumps(payload, default=str, ensure_ascii=False))


def _address(raw: str, field: str) -> str:
    try:
        return validate.address(raw, field)
    except mail_errors.InvalidValue as exc:
        raise errors.InvalidInput(str(exc)) from None


def cmd_preview(args: argparse.Namespace) -> int:
    """Print the rendered subject, text, html and headers for one contact, as JSON."""
    with db.connect(autocommit=True) as conn:
        bid = broadcast_commands.resolve_id(conn, args.account, args.id)
        row = conn.execute(QUERIES["preview_broadcast"],
                           {"account": args.account, "id": bid}).fetchone()
        if row is None:
            raise errors.NotFound(f"no broadcast {bid}")
        contact = conn.execute(QUERIES["preview_contact"],
                               {"account": args.account, "email": args.contact}).fetchone()
    if contact is None and args.contact:
        raise errors.NotFound(f"no contact {args.contact}")
    try:
        keys = unsubscribe.keys_from(os.environ.get("PGCAST_UNSUBSCRIBE_SECRET"),
                                     row["unsubscribe_key"])
        content = message.Content(
            str(row["id"]), row["account"], row["subject"], row["from_address"],
            row["text_body"], row["html_body"], keys=keys, inert=True,
            base_url=unsubscribe.public_url(os.environ.get("PGCAST_PUBLIC_URL")))
        _emit(preview.of(content, contact))
    except (mail_errors.RenderError, mail_errors.InvalidValue) as exc:
        raise errors.InvalidInput(str(exc)) from None
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    """Queue a test send, wait for a worker to deliver it, print each outcome."""
    if len(args.to) > MAX_TO:
        raise errors.InvalidInput(f"--to: at most {MAX_TO} addresses")
    to = list(dict.fromkeys(_address(a, "--to") for a in args.to))
    contact = _address(args.contact, "--contact") if args.contact else None
    url = db.database_url()
    with db.connect(url, autocommit=True) as conn:
        bid = broadcast_commands.resolve_id(conn, args.account, args.id)
        sender_rule.check(conn, args.account, bid)
        row = conn.execute(QUERIES["test_send_queue"], {
            "account": args.account, "id": bid, "to": to, "contact": contact,
            "cap": HOURLY_CAP}).fetchone()
        assert row is not None
        if not row["found"]:
            raise errors.NotFound(f"no broadcast {bid}")
        refused = sender_rule.refused_recipients(row["refused"])
        if refused:  # decided under the erasure lock, with the queue
            raise errors.InvalidInput(refused)
        if not row["ok"]:
            print(f"pgcast: error: at most {HOURLY_CAP} test messages per account per hour "
                  f"({row['recent']} in the last hour)", file=sys.stderr)
            return 1
        ids = list(row["ids"])
        asyncio.run(jobs.defer_test_send(url, ids))
        deadline = time.monotonic() + args.timeout
        while True:  # a worker records each outcome; nothing else tells us
            done = conn.execute(QUERIES["test_send_status"],
                                {"ids": ids, "account": args.account, "id": bid}).fetchall()
            if all(d["status"] in ("sent", "failed") for d in done):
                break
            if time.monotonic() > deadline:
                return _give_up(conn, ids, args.timeout)
            time.sleep(POLL)
    for d in done:
        _emit({"to": d["to_address"], "status": d["status"], "message_id": d["message_id"],
               "error": d["error"]})
    return 0 if all(d["status"] == "sent" for d in done) else 1


def _give_up(conn: psycopg.Connection[Any], ids: list[int], timeout: float) -> int:
    """After --timeout: withdraw what no worker took, so nothing goes out later unseen."""
    withdrawn = conn.execute(QUERIES["test_send_withdraw"], {
        "ids": ids, "error": f"withdrawn: no worker took it within {timeout:g}s"}).fetchall()
    taken = len(ids) - len(withdrawn)
    if taken == 0:
        print(f"pgcast: error: no worker took the test send within {timeout:g}s (is `pgcast "
              "worker` running?); it was withdrawn and will not be sent", file=sys.stderr)
    else:
        print(f"pgcast: error: no answer within {timeout:g}s: {taken} of {len(ids)} test "
              "messages were taken by a worker and may still be delivered; the others were "
              "withdrawn", file=sys.stderr)
    return 1


def _timeout(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds: {raw!r}")
    return value


def register(bsub: Any, account_default: str) -> None:
    """Add `preview` and `test` to `pgcast broadcast`."""
    p = bsub.add_parser("preview", help="the rendered message for one contact (JSON)")
    p.add_argument("id", help="the broadcast's id, or a unique prefix of 8+ characters")
    p.add_argument("--contact", metavar="EMAIL", help="default: the account's first contact")
    p.set_defaults(func=cmd_preview)
    t = bsub.add_parser("test", help="send the rendered message to a few addresses "
                                     "(subject prefixed [TEST]) and wait for the outcome")
    t.add_argument("id", help="the broadcast's id, or a unique prefix of 8+ characters")
    t.add_argument("--to", metavar="ADDR", action="append", required=True,
                   help=f"repeat for up to {MAX_TO} addresses")
    t.add_argument("--contact", metavar="EMAIL", help="whose data fills the template")
    t.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for a worker (default {DEFAULT_TIMEOUT:g})")
    t.set_defaults(func=cmd_test)
    for sp in (p, t):
        sp.add_argument("--account", default=account_default,
                        help=f"the account (tenant) to act on (default {account_default})")
