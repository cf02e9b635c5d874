"""Editing and deleting a broadcast before it sends (the CLI's `edit`/`delete`; the API's
PATCH and DELETE run the same statements)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg

from pgcast.mail import errors as mail_errors
from pgcast.mail import preview
from pgcast.sql import broadcasts, errors, segments, senders
from pgcast.sql.queries import QUERIES

EDITABLE = ("draft", "scheduled")  # a scheduled broadcast is edited until it starts
FIELDS = ("subject", "from", "text", "html", "tag", "segment", "filter", "priority")


def refused(status: str, doing: str) -> dict[str, Any]:
    """The answer when the broadcast has moved on (exit 1 / 409)."""
    allowed = "a draft or a scheduled broadcast" if doing == "edited" else "a draft"
    return {"success": False, "status": status,
            "message": f"Broadcast is {status}; only {allowed} can be {doing}"}


def validated(current: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """The broadcast_update_draft parameters (but account, id and details) for `changes` to
    the stored broadcast `current`, validated as at create; raises InvalidInput. CPU-bound on
    large content: the API runs it in a thread."""
    merged = {"subject": current["subject"], "text": current["text_body"],
              "html": current["html_body"], "tag": current["segment_tag"]}
    merged.update({k: v for k, v in changes.items()
                   if k not in ("from", "priority", "segment", "filter")})
    # the audience: a tag, a saved segment or a filter; setting one clears the others
    new_filter = segments.audience(changes.get("segment"), changes.get("filter"),
                                   changes.get("tag"))
    set_filter = "segment" in changes or "filter" in changes or changes.get("tag") is not None
    set_tag = "tag" in changes
    if new_filter is not None:
        merged["tag"], set_tag = None, True
    values = broadcasts.validate_content(merged["subject"], merged["text"], merged["html"],
                                         merged["tag"])
    return {
        "subject": values["subject"],
        "from_address": broadcasts.validate_from(changes["from"]) if "from" in changes else None,
        "set_text": "text" in changes, "text_body": values["text_body"],
        "set_html": "html" in changes, "html_body": values["html_body"],
        "set_tag": set_tag, "segment_tag": values["segment_tag"],
        "set_filter": set_filter,
        "segment_filter": segments.dumps(new_filter) if new_filter is not None else None,
        "priority": (broadcasts.validate_priority(changes["priority"])
                     if "priority" in changes else None)}


def edit(conn: psycopg.Connection[Any], account: str, bid: uuid.UUID, changes: dict[str, Any],
         details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply `changes` (keys of FIELDS; None clears text, html or tag) to a draft or scheduled
    broadcast, validated as at create; raises InvalidInput or NotFound."""
    current = broadcasts.get(conn, account, bid)
    if current["status"] not in EDITABLE:
        return refused(current["status"], "edited")
    params = validated(current, changes)
    if params["segment_filter"] is not None:  # its saved segments exist, its paths are valid
        segments.check(conn, account, json.loads(params["segment_filter"]))
    try:  # a one-shot command: the trial render runs here, under the budget (as at create)
        preview.trial(params["subject"], params["from_address"] or current["from_address"],
                      params["text_body"], params["html_body"])
    except mail_errors.TemplateInvalid as exc:
        raise errors.InvalidInput(str(exc)) from None
    if params["from_address"] is not None and current["status"] == "scheduled":
        # checked at schedule: a scheduled broadcast's new From must pass the rule as well
        senders.check(conn, account, bid, from_value=params["from_address"])
    row = conn.execute(QUERIES["broadcast_update_draft"], {
        "account": account, "id": bid, "details": json.dumps(details or {}), **params}
    ).fetchone()
    if row is None:  # it started, or was deleted, since we read it: the CAS decided
        return refused(broadcasts.get(conn, account, bid)["status"], "edited")
    return {"success": True, "broadcast": dict(row)}


def delete(conn: psycopg.Connection[Any], account: str, bid: uuid.UUID) -> dict[str, Any]:
    """Delete a draft; raises NotFound."""
    row = conn.execute(QUERIES["broadcast_delete_draft"],
                       {"account": account, "id": bid}).fetchone()
    if row is None:
        return refused(broadcasts.get(conn, account, bid)["status"], "deleted")
    return {"success": True, "id": bid, "message": "Draft deleted"}
