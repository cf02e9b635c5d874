"""`pgcast forms|topics|archive`: sign-up forms, preference topics and the public archive."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pgcast.bin import output
from pgcast.mail import unsubscribe
from pgcast.sql import db, errors, subscribers
from pgcast.sql.queries import QUERIES


def _url(path: str) -> str:
    return f"{unsubscribe.public_url(os.environ.get('PGCAST_PUBLIC_URL'))}{path}"


def _tags(raw: str | None) -> list[str]:
    return [t.strip() for t in (raw or "").split(",") if t.strip()]


def cmd_forms(args: argparse.Namespace) -> int:
    """Run `forms create`, `forms list` or `forms delete`."""
    with db.connect(autocommit=True) as conn:
        if args.action == "create":
            params = subscribers.form_params(
                args.account, args.name, _tags(args.tags), args.from_address,
                double_opt_in=not args.no_double_opt_in, redirect_url=args.redirect,
                embeddable=args.embeddable,
                allowed=subscribers.allowed_senders(conn, args.account))
            row = subscribers.form_create(conn, params)
            output.emit({"id": str(row["id"]), "url": _url(f"/f/{row['id']}")})
            return 0
        if args.action == "list":
            rows = conn.execute(QUERIES["forms_list"], {"account": args.account}).fetchall()
            output.emit({"forms": [{**dict(r), "id": str(r["id"]),
                                    "url": _url(f"/f/{r['id']}")} for r in rows]})
            return 0
        form_id = subscribers.parse_form_id(args.id)
        deleted = conn.execute(QUERIES["form_delete"],
                               {"account": args.account, "id": form_id}).fetchone()
        if deleted is None:
            raise errors.NotFound(f"no form {args.id} in account {args.account}")
        output.emit({"id": str(form_id), "deleted": True})
        return 0


def cmd_topics(args: argparse.Namespace) -> int:
    """Run `topics add`, `topics list` or `topics remove`."""
    with db.connect(autocommit=True) as conn:
        if args.action == "add":
            row = conn.execute(QUERIES["topic_add"],
                               subscribers.topic_params(args.account, args.tag,
                                                        args.label)).fetchone()
            output.emit(dict(row or {}))
            return 0
        if args.action == "list":
            rows = conn.execute(QUERIES["topics_list"], {"account": args.account}).fetchall()
            output.emit({"topics": [dict(r) for r in rows]})
            return 0
        row = conn.execute(QUERIES["topic_remove"],
                           {"account": args.account, "tag": args.tag}).fetchone()
        if row is None:
            raise errors.NotFound(f"no topic {args.tag!r} in account {args.account}")
        output.emit({"tag": args.tag, "removed": True})
        return 0


def cmd_archive(args: argparse.Namespace) -> int:
    """Run `archive enable`."""
    with db.connect(autocommit=True) as conn:
        row = subscribers.archive_enable(conn, args.archive_account, args.slug)
    output.emit({**row, "url": _url(f"/a/{row['slug']}")})
    return 0


def register(sub: Any, parser_class: type[argparse.ArgumentParser],
             account_default: str) -> None:
    """Add `pgcast forms`, `pgcast topics` and `pgcast archive`."""
    def account(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--account", default=account_default,
                        help=f"the account (tenant) to act on (default {account_default})")

    f = sub.add_parser("forms", help="public sign-up forms (double opt-in by default)")
    fsub = f.add_subparsers(dest="action", required=True, parser_class=parser_class)
    fc = fsub.add_parser("create", help="a new form; prints its id and public url")
    fc.add_argument("name", metavar="NAME", help="the form's name (unique in the account)")
    fc.add_argument("--tags", help="comma-separated tags a confirmed sign-up gets")
    fc.add_argument("--from", dest="from_address", required=True, metavar="FROM",
                    help="the From of the confirmation mails, e.g. 'News <news@example.com>'")
    fc.add_argument("--no-double-opt-in", action="store_true",
                    help="subscribe at once, without a confirmation mail")
    fc.add_argument("--redirect", metavar="URL",
                    help="send the browser there (303) after a sign-up and a confirmation")
    fc.add_argument("--embeddable", action="store_true",
                    help="let other sites show the form in a frame")
    fl = fsub.add_parser("list", help="the account's forms")
    fd = fsub.add_parser("delete", help="delete a form (its confirmation links stop working)")
    fd.add_argument("id", metavar="ID", help="the form's id")
    for sp in (fc, fl, fd):
        account(sp)
    f.set_defaults(func=cmd_forms)

    t = sub.add_parser("topics", help="the tags a person may choose on their preference page")
    tsub = t.add_subparsers(dest="action", required=True, parser_class=parser_class)
    ta = tsub.add_parser("add", help="offer a tag as a topic (again: relabel it)")
    ta.add_argument("tag", metavar="TAG", help="the tag")
    ta.add_argument("--label", required=True, help="what the person sees, e.g. 'Product news'")
    tl = tsub.add_parser("list", help="the account's topics")
    tr = tsub.add_parser("remove", help="stop offering a tag (contacts keep it)")
    tr.add_argument("tag", metavar="TAG", help="the tag")
    for sp in (ta, tl, tr):
        account(sp)
    t.set_defaults(func=cmd_topics)

    a = sub.add_parser("archive", help="an account's public archive of sent broadcasts")
    asub = a.add_subparsers(dest="action", required=True, parser_class=parser_class)
    ae = asub.add_parser("enable", help="publish /a/SLUG: the broadcasts created with --archive")
    ae.add_argument("archive_account", metavar="ACCOUNT", help="the account")
    ae.add_argument("--slug", required=True, help="the page's name: a-z, 0-9 and dashes")
    a.set_defaults(func=cmd_archive)
