"""Broadcasts: validation shared by the CLI and the API, and the control operations."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg

from pgcast.mail import errors as mail_errors
from pgcast.mail import preview, template
from pgcast.mail import validate as validate_mail
from pgcast.sql import contacts, errors, segments, tracking
from pgcast.sql import senders as sender_rule
from pgcast.sql.queries import QUERIES

# A snapshot this big changes the table's shape at once: without fresh statistics the workers'
# first plans are poor (measured: the first 200k drain of a new table 3.3k/s, 7.1k/s after it).
ANALYZE_AFTER = 10_000  # recipients
TERMINAL = ("sent", "failed", "cancelled")


def parse_id(raw: str) -> uuid.UUID:
    """A broadcast id; raises InvalidInput."""
    try:
        return uuid.UUID(str(raw))
    except ValueError:
        raise errors.InvalidInput(f"not a broadcast id: {raw!r}") from None


def validate_from(raw: Any) -> str:
    """A From value, `addr` or `Name <addr>`, kept as given; raises InvalidInput.

    Refused, never rewritten, when a mail reader would read it as anything but exactly one
    address (mail.validate.sender).
    """
    try:
        validate_mail.sender(raw)
    except mail_errors.InvalidValue as exc:
        raise errors.InvalidInput(str(exc)) from None
    return str(raw).strip()


def validate_content(subject: Any, text: Any, html: Any, tag: Any) -> dict[str, Any]:
    """Checked subject/text/html/tag; raises InvalidInput."""
    try:
        clean_subject = validate_mail.subject(subject)
    except mail_errors.InvalidValue as exc:
        raise errors.InvalidInput(str(exc)) from None
    for label, value in (("text", text), ("html", html)):
        if value is not None and not isinstance(value, str):
            raise errors.InvalidInput(f"{label} must be a string")
        if isinstance(value, str) and "\x00" in value:
            raise errors.InvalidInput(f"{label} must not contain NUL")
    if not (text or html):
        raise errors.InvalidInput("a broadcast needs text or html content")
    try:  # merge tags: syntax and names, checked before anything is stored
        template.check_broadcast(clean_subject, text or None, html or None)
    except mail_errors.TemplateInvalid as exc:
        raise errors.InvalidInput(str(exc)) from None
    if tag is not None:
        tag = contacts.validate_tags([tag])[0]
    return {"subject": clean_subject, "text_body": text or None, "html_body": html or None,
            "segment_tag": tag}


def validate_priority(raw: Any) -> int:
    """A broadcast's priority: an integer 1-10; raises InvalidInput."""
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 10:
        raise errors.InvalidInput("priority must be an integer from 1 to 10")
    return raw


def audience_filter(conn: psycopg.Connection[Any], account: str, segment: Any = None,
                    filter_value: Any = None, tag: Any = None) -> str | None:
    """A draft's segment_filter as JSON text (None: its tag, or every contact), from at most
    one of a saved segment's name, a filter and a tag; checked against the account's saved
    segments; raises InvalidInput naming the JSON path."""
    value = segments.audience(segment, filter_value, tag)
    if value is None:
        return None
    segments.check(conn, account, value)
    return segments.dumps(value)


def create(conn: psycopg.Connection[Any], account: str, *, subject: Any, from_address: Any,
           text: Any = None, html: Any = None, tag: Any = None, segment: Any = None,
           filter_value: Any = None, rate_limit: float | None = None, priority: Any = 1,
           details: dict[str, Any] | None = None, track: Any = None) -> dict[str, Any]:
    """Create a draft (details: who, for its audit entry); raises InvalidInput. Its audience:
    at most one of tag, segment (a saved segment's name) and filter_value (a filter)."""
    segment_filter = audience_filter(conn, account, segment, filter_value, tag)
    fields = validate_content(subject, text, html, tag)
    fields["from_address"] = validate_from(from_address)
    try:  # a one-shot command: the trial render runs here, under the same budget
        preview.trial(fields["subject"], fields["from_address"], fields["text_body"],
                      fields["html_body"])
    except mail_errors.TemplateInvalid as exc:
        raise errors.InvalidInput(str(exc)) from None
    if rate_limit is not None and rate_limit <= 0:
        raise errors.InvalidInput("rate limit must be positive")
    row = conn.execute(QUERIES["broadcast_create"],
                       {"account": account, "rate_limit": rate_limit,
                        "priority": validate_priority(priority),
                        "track": None if track is None else tracking.validate_mode(track),
                        "details": json.dumps(details) if details else None,
                        "segment_filter": segment_filter, **fields}).fetchone()
    assert row is not None
    return dict(row)


def get(conn: psycopg.Connection[Any], account: str, broadcast_id: uuid.UUID) -> dict[str, Any]:
    """One broadcast; raises NotFound."""
    row = conn.execute(QUERIES["broadcast_get"],
                       {"account": account, "id": broadcast_id}).fetchone()
    if row is None:
        raise errors.NotFound(f"no broadcast {broadcast_id}")
    return dict(row)


# -- results: the response of each control operation, shared by the CLI and the API --------


def audience_label(row: dict[str, Any] | None) -> str | None:
    """How a broadcast's audience is named in messages (None: every contact)."""
    if row is None:
        return None
    if row.get("segment_filter") is not None:
        value = row["segment_filter"]
        if isinstance(value, dict) and set(value) == {"segment"}:
            return f"segment {value['segment']!r}"
        return f"the filter {segments.dumps(value)}"
    return f"tag {row['segment_tag']!r}" if row.get("segment_tag") else None


def send_result(row: dict[str, Any], segment: str | None = None) -> dict[str, Any]:
    """The answer to a send, from a pgcast_send_v7 row (segment: audience_label's name of
    the broadcast's audience)."""
    if not row["ok"]:
        if row["status"] == "empty":
            who = segment or "the account"
            return {"success": False, "status": "empty", "queued": 0,
                    "message": f"Nobody to send to: no subscribed contact matches {who}; "
                               "nothing was sent (allow_empty sends it anyway)"}
        return {"success": False, "status": row["status"],
                "message": f"Broadcast is {row['status']}; only a draft can be sent"}
    n = row["queued"]
    message = (f"Broadcast queued for {n} recipient{'s' if n != 1 else ''}" if n else
               "Broadcast has no recipients; marked sent")
    return {"success": True, "status": row["status"], "queued": n, "message": message}


def cancel_result(row: dict[str, Any]) -> dict[str, Any]:
    """The answer to a cancel, from a pgcast_cancel_v2 row."""
    if not row["ok"]:
        return {"success": False, "status": row["status"],
                "message": f"Broadcast is already {row['status']}; nothing to cancel"}
    n = row["already_queued"]
    return {"success": True, "status": "cancelled", "alreadyQueued": n,
            "message": f"Cancelled — {n} emails were already handed to the provider"}


def pause_result(row: dict[str, Any], reason: str) -> dict[str, Any]:
    """The answer to a pause, from a pgcast_pause_v3 row."""
    if not row["ok"]:
        return {"success": False, "status": row["status"],
                "message": f"Broadcast is {row['status']}; only a sending broadcast can be paused"}
    return {"success": True, "status": "paused", "message": f"Paused ({reason})"}


def resume_result(row: dict[str, Any]) -> dict[str, Any]:
    """The answer to a resume, from a pgcast_resume_v1 row."""
    if not row["ok"]:
        return {"success": False, "status": row["status"],
                "message": f"Broadcast is {row['status']}; only a paused broadcast can be resumed"}
    return {"success": True, "status": "sending", "message": "Resumed"}


def _control(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> dict[str, Any]:
    row = conn.execute(QUERIES[query], params).fetchone()
    if row is None:
        raise errors.NotFound(f"no broadcast {params['id']}")
    return dict(row)


def send(conn: psycopg.Connection[Any], account: str, broadcast_id: uuid.UUID, *,
         allow_empty: bool = False, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Snapshot and start sending: the seed system's response shape."""
    sender_rule.check(conn, account, broadcast_id)  # InvalidInput: a From it may not use
    with segments.filter_errors():  # a saved segment deleted since: InvalidInput, exit 2
        row = _control(conn, "broadcast_send", {"account": account, "id": broadcast_id,
                                                "allow_empty": allow_empty,
                                                "details": json.dumps(details or {})})
    segment = None
    if row["status"] == "empty":
        found = conn.execute(QUERIES["broadcast_get"],
                             {"account": account, "id": broadcast_id}).fetchone()
        segment = audience_label(dict(found) if found else None)
    result = send_result(row, segment)
    if needs_analyze(result):
        conn.execute(QUERIES["analyze_recipients"], {"id": broadcast_id})
    return result


def needs_analyze(result: dict[str, Any]) -> bool:
    """Whether a send just snapshotted enough rows to refresh the planner's statistics."""
    return bool(result["success"] and result.get("queued", 0) >= ANALYZE_AFTER)


def cancel(conn: psycopg.Connection[Any], account: str, broadcast_id: uuid.UUID,
           details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cancel a draft, sending or paused broadcast."""
    return cancel_result(_control(conn, "broadcast_cancel", {
        "account": account, "id": broadcast_id, "details": json.dumps(details or {})}))


def pause(conn: psycopg.Connection[Any], account: str | None, broadcast_id: uuid.UUID,
          reason: str = "operator", details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pause a sending broadcast (account None: any account, for the worker)."""
    return pause_result(_control(conn, "broadcast_pause", {
        "account": account, "id": broadcast_id, "reason": reason,
        "details": json.dumps(details or {})}), reason)


def resume(conn: psycopg.Connection[Any], account: str, broadcast_id: uuid.UUID,
           details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Resume a paused broadcast."""
    return resume_result(_control(conn, "broadcast_resume", {
        "account": account, "id": broadcast_id, "details": json.dumps(details or {})}))


def progress(conn: psycopg.Connection[Any], account: str,
             broadcast_id: uuid.UUID) -> dict[str, Any]:
    """The O(1) progress row; raises NotFound."""
    row = conn.execute(QUERIES["broadcast_progress"],
                       {"account": account, "id": broadcast_id}).fetchone()
    if row is None:
        raise errors.NotFound(f"no broadcast {broadcast_id}")
    return dict(row)


def list_page(conn: psycopg.Connection[Any], account: str, limit: int = 50,
              before: tuple[Any, Any] | None = None) -> list[dict[str, Any]]:
    """A page of an account's broadcasts, newest first."""
    before_at, before_id = before if before else (None, None)
    rows = conn.execute(QUERIES["broadcast_list"], {
        "account": account, "limit": limit, "before_at": before_at, "before_id": before_id})
    return [dict(r) for r in rows]
