"""`pgcast broadcast show|edit|delete`: read a broadcast whole, fix a draft before it sends."""

from __future__ import annotations

import argparse
from typing import Any

from pgcast.api import broadcasts as api_broadcasts
from pgcast.bin import broadcast_commands, output, segment_commands
from pgcast.sql import broadcasts, db, drafts, errors


def changes(args: argparse.Namespace) -> dict[str, Any]:
    """The fields `edit` was asked to change (a --no-… flag clears text, html or tag)."""
    got: dict[str, Any] = {}
    for key, value in (("subject", args.subject), ("from", args.from_address),
                       ("tag", args.tag), ("segment", args.segment),
                       ("filter", segment_commands.filter_arg(args.filter)),
                       ("priority", args.priority)):
        if value is not None:
            got[key] = value
    for key in ("text", "html"):
        path = getattr(args, key)
        if path is not None:
            got[key] = output.read_file(path)
    for key in ("text", "html", "tag", "filter"):
        if getattr(args, f"no_{key}"):
            if key in got:
                raise errors.InvalidInput(f"--{key} and --no-{key} together")
            got[key] = None
    if not got:
        raise errors.InvalidInput("nothing to change: give --subject, --from, --text, --html, "
                                  "--tag, --segment, --filter, --priority or a --no-… flag")
    return got


def cmd_draft(args: argparse.Namespace) -> int:
    """Run show, edit or delete."""
    with db.connect(autocommit=True) as conn:
        bid = broadcast_commands.resolve_id(conn, args.account, args.id)
        if args.action == "show":
            output.emit(api_broadcasts.broadcast_json(broadcasts.get(conn, args.account, bid)))
            return 0
        if args.action == "delete":
            result = drafts.delete(conn, args.account, bid)
            output.emit(result)
            return 0 if result["success"] else 1
        result = drafts.edit(conn, args.account, bid, changes(args),
                             details=output.actor(args.actor))
    if not result["success"]:
        output.emit(result)
        return 1
    output.emit(api_broadcasts.with_warnings(api_broadcasts.broadcast_json(result["broadcast"])))
    return 0


def _priority(raw: str) -> int:
    try:
        return broadcasts.validate_priority(int(raw))
    except ValueError:
        raise argparse.ArgumentTypeError("priority must be an integer from 1 to 10") from None
    except errors.InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(bsub: Any) -> list[argparse.ArgumentParser]:
    """Add show, edit and delete to `pgcast broadcast`; return their parsers (the caller adds
    --account)."""
    sh = bsub.add_parser("show", help="a broadcast in full, content included (JSON)")
    ed = bsub.add_parser("edit", help="change a draft or a scheduled broadcast before it "
                                      "starts (as PATCH /broadcasts/{id})")
    ed.add_argument("--subject", help="the new subject line")
    ed.add_argument("--from", dest="from_address", metavar="ADDR", help="the new From")
    ed.add_argument("--text", metavar="FILE", help="the new plain-text body")
    ed.add_argument("--html", metavar="FILE", help="the new HTML body")
    ed.add_argument("--tag", help="send only to contacts with this tag")
    ed.add_argument("--segment", metavar="NAME", help="send to a saved segment")
    ed.add_argument("--filter", metavar="JSON", help="send to the contacts a filter selects "
                                                     "(JSON or @FILE)")
    ed.add_argument("--priority", type=_priority, metavar="N", help="1-10")
    for key, what in (("text", "the plain-text body"), ("html", "the HTML body"),
                      ("tag", "the tag: send to every contact"),
                      ("filter", "the segment or filter: send to every contact")):
        ed.add_argument(f"--no-{key}", action="store_true", help=f"clear {what}")
    ed.add_argument("--actor", metavar="NAME",
                    help="who is doing this, for the audit log (default: the OS user)")
    de = bsub.add_parser("delete", help="delete a draft")
    for sp in (sh, ed, de):
        sp.add_argument("id", help="the broadcast id, or a unique prefix of 8+ characters")
        sp.set_defaults(func=cmd_draft)
    return [sh, ed, de]
