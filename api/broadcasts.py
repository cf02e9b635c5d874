"""Broadcast drafts: create, list, read, edit and delete (drafts only)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from pgcast.api import auth, context, control, db, errors, http, rendering, senders
from pgcast.api import segments as segment_routes
from pgcast.mail import template
from pgcast.sql import broadcasts, drafts, segments, tracking
from pgcast.sql import errors as sql_errors

PAGE_DEFAULT = 50
PAGE_MAX = 200
COUNTERS = ("total", "sent", "failed", "skipped", "unknown", "cancelled")
CONTENT_FIELDS = {"subject": http.STRING, "from": http.STRING, "text": http.STRING_OR_NULL,
                  "html": http.STRING_OR_NULL, "tag": http.STRING_OR_NULL,
                  "segment": http.STRING_OR_NULL, "filter": http.OBJECT_OR_NULL}
AUDIENCE = ("tag", "segment", "filter")


def pending(row: dict[str, Any]) -> int:
    """Recipients not yet in a terminal state."""
    return int(row["total"]) - sum(int(row[c]) for c in COUNTERS[1:])


def summary_json(row: dict[str, Any]) -> dict[str, Any]:
    """A broadcast as listed."""
    return {"id": row["id"], "status": row["status"], "subject": row["subject"],
            "tag": row["segment_tag"], "filter": row["segment_filter"],
            "filter_used": row["filter_used"],
            **{c: row[c] for c in COUNTERS}, "pending": pending(row),
            "created_at": row["created_at"], "started_at": row["started_at"],
            "finished_at": row["finished_at"], "scheduled_at": row["scheduled_at"]}


def broadcast_json(row: dict[str, Any]) -> dict[str, Any]:
    """A broadcast in full."""
    return {**summary_json(row), "from": row["from_address"], "text": row["text_body"],
            "html": row["html_body"], "paused_reason": row["paused_reason"],
            "priority": row["priority"], "track": row["track"],
            "updated_at": row["updated_at"], "not_after": row["not_after"],
            "failed_reason": row["failed_reason"]}


def with_warnings(body: dict[str, Any]) -> dict[str, Any]:
    """A create/update answer with what should be fixed (no unsubscribe link, ...)."""
    return {**body, "warnings": template.warnings(body["text"], body["html"])}


def _invalid(exc: sql_errors.InvalidInput) -> errors.InvalidBody:
    return errors.InvalidBody(str(exc))


async def create(request: Request) -> Response:
    """POST /broadcasts: a new draft."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body",
                       {k: CONTENT_FIELDS[k] for k in ("subject", "from")},
                       {**{k: CONTENT_FIELDS[k] for k in ("text", "html", *AUDIENCE)},
                        "priority": http.INTEGER, "archive": http.BOOLEAN,
                        "track": http.STRING})
    try:
        segment_filter = await segment_routes.checked(request, who.account, segments.audience(
            body.get("segment"), body.get("filter"), body.get("tag")))
        # templates are parsed and compiled to be checked: CPU work, off the event loop
        values = await asyncio.to_thread(broadcasts.validate_content, body["subject"],
                                         body.get("text"), body.get("html"), body.get("tag"))
        values["from_address"] = broadcasts.validate_from(body["from"])
        values["priority"] = broadcasts.validate_priority(body.get("priority", 1))
        values["track"] = (tracking.validate_mode(body["track"]) if "track" in body else None)
    except sql_errors.InvalidInput as exc:
        raise _invalid(exc) from None
    await rendering.trial(request, who.account, values["subject"], values["from_address"],
                          values["text_body"], values["html_body"])
    row = await db.one(context.pool(request), "broadcast_create",
                       {"account": who.account, "details": control.details(who),
                        "rate_limit": None, "segment_filter": segment_filter, **values})
    assert row is not None
    if body.get("archive"):  # issue 28: listed on the archive page once sent
        await db.one(context.pool(request), "broadcast_set_archive",
                     {"account": who.account, "id": row["id"], "archive": True})
    return http.Json(with_warnings(broadcast_json(row)), status_code=201,
                     headers={"Location": f"/broadcasts/{row['id']}"})


def _encode_cursor(row: dict[str, Any]) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['id']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, bid = raw.partition("|")
        when = dt.datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive timestamp")
        return when, uuid.UUID(bid)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise errors.InvalidBody("cursor is not a cursor this API returned") from None


async def list_page(request: Request) -> Response:
    """GET /broadcasts: newest first, keyset-paged by an opaque cursor."""
    who = auth.principal(request)
    limit = http.query_int(request, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
    cursor = request.query_params.get("cursor")
    before_at, before_id = _decode_cursor(cursor) if cursor else (None, None)
    rows = await db.all_rows(context.pool(request), "broadcast_list", {  # one more: a next page?
        "account": who.account, "limit": limit + 1, "before_at": before_at,
        "before_id": before_id})
    page = rows[:limit]
    next_cursor = _encode_cursor(page[-1]) if len(rows) > limit else None
    return http.Json({"broadcasts": [summary_json(r) for r in page], "next_cursor": next_cursor})


async def get(request: Request) -> Response:
    """GET /broadcasts/{id}."""
    who = auth.principal(request)
    row = await db.one(context.pool(request), "broadcast_get",
                       {"account": who.account, "id": context.broadcast_id(request)})
    if row is None:
        raise errors.NotFound(context.NO_BROADCAST)
    return http.Json(broadcast_json(row))


async def refused(request: Request, account: str, bid: uuid.UUID, doing: str) -> Response:
    """409 with the current status, or 404 when the broadcast is gone or not ours."""
    row = await db.one(context.pool(request), "api_broadcast_status",
                       {"account": account, "id": bid})
    if row is None:
        raise errors.NotFound(context.NO_BROADCAST)
    return http.Json(drafts.refused(row["status"], doing), status_code=409)


async def update(request: Request) -> Response:
    """PATCH /broadcasts/{id}: edit a draft or a scheduled broadcast; null clears text, html
    or tag."""
    who = auth.principal(request)
    bid = context.broadcast_id(request)
    body = http.fields(await http.read_json(request), "body", {},
                       {**CONTENT_FIELDS, "priority": http.INTEGER})
    if not body:
        raise errors.InvalidBody("nothing to change: give subject, from, text, html, tag, "
                                 "segment, filter or priority")
    current = await db.one(context.pool(request), "broadcast_get",
                           {"account": who.account, "id": bid})
    if current is None:
        raise errors.NotFound(context.NO_BROADCAST)
    if current["status"] not in drafts.EDITABLE:
        return await refused(request, who.account, bid, "edited")
    try:
        params = await asyncio.to_thread(drafts.validated, current, body)
        if params["segment_filter"] is not None:  # its saved segments exist, paths valid
            await segment_routes.checked(request, who.account,
                                         json.loads(params["segment_filter"]))
    except sql_errors.InvalidInput as exc:
        raise _invalid(exc) from None
    if params["from_address"] is not None and current["status"] == "scheduled":
        # checked at schedule: a scheduled broadcast's new From must pass the rule as well
        await senders.check(request, who.account, bid, from_value=params["from_address"])
    await rendering.trial(request, who.account, params["subject"],
                          params["from_address"] or current["from_address"],
                          params["text_body"], params["html_body"])
    row = await db.one(context.pool(request), "broadcast_update_draft", {
        "account": who.account, "id": bid, "details": control.details(who), **params})
    if row is None:  # sent or deleted since we read it: the CAS decided
        return await refused(request, who.account, bid, "edited")
    return http.Json(with_warnings(broadcast_json(row)))


async def delete(request: Request) -> Response:
    """Delete a draft: DELETE /broadcasts/{id}."""
    who = auth.principal(request)
    bid = context.broadcast_id(request)
    row = await db.one(context.pool(request), "broadcast_delete_draft",
                       {"account": who.account, "id": bid})
    if row is None:
        return await refused(request, who.account, bid, "deleted")
    return Response(status_code=204)
