"""`pgcast contacts import|add|list|count|export|resubscribe|erase`."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import psycopg

from pgcast.bin import output
from pgcast.sql import contacts, contacts_csv, db, errors

PAGE = 1000  # contacts read per statement by list and export
NOTES_SHOWN = 20  # normalisation notes printed before "... and N more"
LIST_COLUMNS = ("email", "name", "tags", "status", "created_at")


def cmd_import(args: argparse.Namespace) -> int:
    """Import a CSV: exit 0 when every row was imported, 1 when some were rejected, 2 when
    the file itself is unusable (then nothing is imported)."""
    items, refused = contacts_csv.read(Path(args.file), args.encoding)
    batch = contacts.validate(items, replace=args.replace)
    with db.connect() as conn:
        done = contacts.upsert(conn, args.account, batch.rows, replace=args.replace)
    rejected = refused + batch.rejected
    rejected += [contacts.Rejected(r["where"], r["email"], contacts.ERASED_REASON)
                 for r in done.erased]
    for r in sorted(rejected, key=lambda r: r.where):
        print(f"line {r.where}: {r.email}: {r.reason}", file=sys.stderr)
    for note in batch.normalised[:NOTES_SHOWN]:
        print(f"line {note.where}: {note.given} stored as {note.stored}", file=sys.stderr)
    if len(batch.normalised) > NOTES_SHOWN:
        print(f"... and {len(batch.normalised) - NOTES_SHOWN} more addresses normalised",
              file=sys.stderr)
    for note in batch.respelled[:NOTES_SHOWN]:
        print(f"line {note.where}: {note.given} stored as {note.stored} (a later row spells "
              "the same address so; the later spelling is kept)", file=sys.stderr)
    if len(batch.respelled) > NOTES_SHOWN:
        print(f"... and {len(batch.respelled) - NOTES_SHOWN} more addresses respelled",
              file=sys.stderr)
    output.emit({"imported": done.inserted + done.updated, "inserted": done.inserted,
                 "updated": done.updated, "merged": batch.merged,
                 "normalised": len(batch.normalised), "rejected": len(rejected)})
    return 1 if rejected else 0


def _attrs(pairs: list[str]) -> dict[str, str]:
    """--attr k=v pairs as string attributes (as a CSV column would give them)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise errors.InvalidInput(f"--attr takes KEY=VALUE: {pair!r}")
        out[key.strip()] = value
    return out


def cmd_add(args: argparse.Namespace) -> int:
    """Add (or update) one contact, merged as an import merges; exit 1 when it was erased."""
    batch = contacts.validate([(1, args.email, args.name, args.tag or [],
                                _attrs(args.attr or []) or None)])
    if batch.rejected:
        raise errors.InvalidInput(f"{batch.rejected[0].email}: {batch.rejected[0].reason}")
    with db.connect() as conn:
        done = contacts.upsert(conn, args.account, batch.rows)
    address = batch.rows[0]["email"]
    if done.erased:
        output.emit({"success": False, "email": address, "message": contacts.ERASED_REASON})
        return 1
    output.emit({"success": True, "email": address, "inserted": bool(done.inserted)})
    return 0


def _pages(conn: psycopg.Connection[Any], args: argparse.Namespace,
           limit: int) -> Iterator[dict[str, Any]]:
    """Contacts in address order from --after on, at most `limit` (0 = all)."""
    after, left = args.after or "", limit or -1
    while left != 0:
        size = PAGE if left < 0 else min(PAGE, left)
        rows = contacts.page(conn, args.account, tag=args.tag, status=args.status,
                             after=after, limit=size)
        yield from rows
        if len(rows) < size:
            return
        after = rows[-1]["key"]
        left = left - len(rows) if left > 0 else left


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    return {"email": row["email"], "name": row["name"], "tags": row["tags"],
            "attributes": row["attributes"], "status": contacts.status_of(row),
            "unsubscribed_at": row["unsubscribed_at"],
            "suppressed_reason": row["suppressed_reason"], "created_at": row["created_at"]}


def cmd_list(args: argparse.Namespace) -> int:
    """List contacts: a table on a terminal, JSON otherwise."""
    with db.connect() as conn:
        rows = [_shown(r) for r in _pages(conn, args, args.limit + 1 if args.limit else 0)]
    more = bool(args.limit) and len(rows) > args.limit
    rows = rows[: args.limit] if args.limit else rows
    output.listing(rows, LIST_COLUMNS, as_json=output.wants_json(args.json))
    if more:
        print(f"more: --after {rows[-1]['email'].lower()}", file=sys.stderr)
    return 0


def cmd_count(args: argparse.Namespace) -> int:
    """How many contacts, by mailing status."""
    with db.connect() as conn:
        output.emit(contacts.count(conn, args.account, args.tag))
    return 0


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@contextlib.contextmanager
def _target(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdout
        return
    try:
        handle = Path(path).open("w", newline="", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise errors.InvalidInput(f"cannot write {path}: {exc.strerror}") from None
    with handle:
        yield handle


def cmd_export(args: argparse.Namespace) -> int:
    """Write contacts as a CSV that `contacts import` reads back, status columns included."""
    n = 0
    with db.connect() as conn, _target(args.file) as out:
        keys = contacts.attribute_keys(conn, args.account)
        writer = csv.writer(out)
        writer.writerow([contacts_csv.EMAIL, contacts_csv.NAME, contacts_csv.TAGS, *keys,
                         contacts_csv.UNSUBSCRIBED_AT, contacts_csv.SUPPRESSED_REASON])
        args.after = ""
        for row in _pages(conn, args, 0):
            if "confirmed_at" in row and row["confirmed_at"] is None:
                continue  # an unconfirmed sign-up: imported elsewhere it would be mailable
            attrs = row["attributes"]
            unsubscribed = row["unsubscribed_at"]
            writer.writerow([row["email"], row["name"], ";".join(row["tags"]),
                             *(_cell(attrs[k]) if k in attrs else "" for k in keys),
                             unsubscribed.isoformat() if unsubscribed else "",
                             row["suppressed_reason"] or ""])
            n += 1
    if args.file != "-":
        output.emit({"exported": n, "file": args.file})
    return 0


def cmd_resubscribe(args: argparse.Namespace) -> int:
    """Clear an unsubscribe (recorded in contact_events with who did it)."""
    with db.connect() as conn:
        row = contacts.resubscribe(conn, args.account, args.email, source="cli",
                                   actor=output.actor(args.actor))
        conn.commit()
    message = ("Resubscribed" if row["changed"] else "Was not unsubscribed; nothing changed")
    if row["suppressed"]:
        message += "; still suppressed (bounce or complaint): not mailable"
    output.emit({"success": True, "email": row["email"], "resubscribed": row["changed"],
                 "suppressed": row["suppressed"], "message": message})
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    """Erase an address's data; keep the hash that refuses its re-import."""
    with db.connect() as conn:
        row = contacts.erase(conn, args.account, args.email, source="cli",
                             actor=output.actor(args.actor))
        conn.commit()
    found = row["contact_id"] is not None
    output.emit({"success": True, "erased": found, "recipient_rows": row["recipients"],
                 "message": ("Erased from the contact and its recipient rows" if found else
                             "No such contact; the address will be refused at import")})
    return 0


def register(csub: Any, account_default: str) -> list[argparse.ArgumentParser]:
    """Add the operator's contact commands; return their parsers (the caller adds --account)."""
    ad = csub.add_parser("add", help="add one contact, or update the stored one as an import "
                                     "row does (what is given replaces, attributes merge)")
    ad.add_argument("email", help="the address")
    ad.add_argument("--name", help="the contact's name")
    ad.add_argument("--tag", action="append", metavar="TAG",
                    help="a tag (repeat for more; given, they replace the stored tags)")
    ad.add_argument("--attr", action="append", metavar="KEY=VALUE",
                    help="a string attribute for merge tags (repeat for more)")
    ad.set_defaults(func=cmd_add)
    ls = csub.add_parser("list", help="contacts by address: a table on a terminal, else JSON")
    ls.add_argument("--limit", type=int, default=100,
                    help="at most N contacts (default 100; 0 = all)")
    ls.add_argument("--after", metavar="EMAIL",
                    help="start after this address (the cursor a longer list prints)")
    ls.add_argument("--json", action="store_true", help="JSON even on a terminal")
    ls.set_defaults(func=cmd_list)
    cn = csub.add_parser("count", help="how many contacts: subscribed, unsubscribed, "
                                       "suppressed")
    cn.add_argument("--tag", help="only contacts with this tag")
    cn.set_defaults(func=cmd_count)
    ex = csub.add_parser("export", help="write contacts as CSV (the columns import reads, "
                                        "plus unsubscribed_at and suppressed_reason)")
    ex.add_argument("file", help="the CSV file to write ('-' for stdout)")
    ex.set_defaults(func=cmd_export)
    for sp in (ls, ex):
        sp.add_argument("--tag", help="only contacts with this tag")
        sp.add_argument("--status", choices=contacts.STATUSES,
                        help="only subscribed, unsubscribed or suppressed contacts")
    rs = csub.add_parser("resubscribe", help="clear a contact's unsubscribe (recorded in "
                                             "contact_events)")
    rs.set_defaults(func=cmd_resubscribe)
    er = csub.add_parser("erase", help="erase a person's data (right to erasure); only a "
                                       "hash is kept, so a re-import is refused")
    er.set_defaults(func=cmd_erase)
    for sp in (rs, er):
        sp.add_argument("email", help="the contact's address")
        sp.add_argument("--actor", metavar="NAME",
                        help="who is doing this, for the record (default: the OS user)")
    return [ad, ls, cn, ex, rs, er]
