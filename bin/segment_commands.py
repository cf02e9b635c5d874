"""`pgcast segment save|list|show|delete|count`: saved segments and filter counts."""

from __future__ import annotations

import argparse
from typing import Any

from pgcast.bin import output
from pgcast.sql import db, errors, segments


def filter_arg(raw: str | None) -> Any:
    """A filter given as JSON text or @FILE (None stays None); raises InvalidInput (exit 2)."""
    if raw is None:
        return None
    if raw.startswith("@"):
        return segments.parse(output.read_file(raw[1:]), raw)
    return segments.parse(raw)


def cmd_segment(args: argparse.Namespace) -> int:
    """Run one segment command."""
    with db.connect(autocommit=True) as conn:
        if args.action == "save":
            row = segments.save(conn, args.account, args.name, filter_arg(args.filter))
            output.emit({"success": True, "name": row["name"], "created": row["inserted"],
                         "filter": row["filter"],
                         "count": segments.count(conn, args.account, row["filter"])})
            return 0
        if args.action == "list":
            output.emit({"segments": segments.list_all(conn, args.account)})
            return 0
        if args.action == "show":
            output.emit(segments.get(conn, args.account, args.name))
            return 0
        if args.action == "delete":
            result = segments.delete(conn, args.account, args.name)
            output.emit(result)
            return 0 if result["success"] else 1
        # count: a saved segment by name, or a filter
        if (args.name is None) == (args.filter is None):
            raise errors.InvalidInput("give a segment NAME or --filter JSON (one)")
        value = (filter_arg(args.filter) if args.filter is not None
                 else {"segment": segments.check_name(args.name)})
        output.emit({"count": segments.count(conn, args.account, value)})
    return 0


def register(sub: Any, account_default: str) -> None:
    """Add `pgcast segment ...`."""
    s = sub.add_parser("segment", help="saved segments: filters over contacts "
                                       "(docs/segments.md)")
    ssub = s.add_subparsers(dest="action", required=True, parser_class=type(s))
    sv = ssub.add_parser("save", help="create or replace a saved segment")
    sv.add_argument("name", help="1-64 letters, digits, '_', '.', '-'")
    sv.add_argument("filter", metavar="FILTER_JSON_OR_@FILE",
                    help="the filter as JSON, or @FILE to read it from a file")
    ls = ssub.add_parser("list", help="the account's saved segments by name")
    sh = ssub.add_parser("show", help="one saved segment")
    sh.add_argument("name", help="the saved segment")
    de = ssub.add_parser("delete", help="delete a saved segment nothing refers to")
    de.add_argument("name", help="the saved segment")
    co = ssub.add_parser("count", help="how many mailable contacts a segment or filter "
                                       "selects now")
    co.add_argument("name", nargs="?", help="a saved segment")
    co.add_argument("--filter", metavar="JSON", help="a filter (JSON or @FILE) instead")
    for sp in (sv, ls, sh, de, co):
        sp.add_argument("--account", default=account_default,
                        help="the account (tenant) to act on")
    s.set_defaults(func=cmd_segment)
