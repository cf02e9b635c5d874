"""POST /messages and GET /messages/{id}: transactional messages (issue 26).

A message is queued with pgcast_send_message_v3 (the function applications call in their own
transactions), so the API, the CLI and SQL share one table, one idempotency rule and one
set of checks; the worker's message loop delivers it. Its commit sends no NOTIFY (one would
serialise the commits of concurrent requests): the process's Waker (api/wake.py) wakes the
loops after it, one NOTIFY for the requests of the same 20 ms.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
from starlette.requests import Request
from starlette.responses import Response

from pgcast.api import auth, context, db, errors, http, rendering
from pgcast.mail import errors as mail_errors
from pgcast.mail import renderpool, transactional, validate
from pgcast.sql import senders as sql_senders

NO_MESSAGE = "no such message"
MAX_KEY = 255  # characters of an idempotency key
MAX_DATA_BYTES = 256 * 1024  # a template's data, as JSON
TEMPLATE = {"subject": http.STRING}
TEMPLATE_OPTIONAL = {"text": http.STRING_OR_NULL, "html": http.STRING_OR_NULL}
BODY_OPTIONAL = {
    "from": http.STRING, "subject": http.STRING, "text": http.STRING_OR_NULL,
    "html": http.STRING_OR_NULL, "template": http.OBJECT_OR_NULL, "data": http.OBJECT_OR_NULL,
    "reply_to": http.STRING_OR_NULL, "headers": http.OBJECT_OR_NULL,
    "tags": http.OBJECT_OR_NULL, "category": http.STRING_OR_NULL,
    "idempotency_key": http.STRING_OR_NULL}


def item(row: dict[str, Any]) -> dict[str, Any]:
    """One message as the API shows it (a message_status row)."""
    return {"id": str(row["id"]), "status": row["status"], "category": row["category"],
            "to": row["to_address"], "from": row["from_address"], "subject": row["subject"],
            "idempotency_key": row["idempotency_key"], "attempts": row["attempts"],
            "error": row["error"], "provider_message_id": row["provider_message_id"],
            "created_at": row["created_at"], "handed_at": row["handed_at"],
            "sent_at": row["sent_at"], "finished_at": row["finished_at"],
            "delivered_at": row["delivered_at"], "bounced_at": row["bounced_at"],
            "complained_at": row["complained_at"], "feedback_detail": row["feedback_detail"]}


def _checked(body: dict[str, Any]) -> dict[str, Any]:
    """The parameters of message_send from a request body; raises InvalidBody."""
    try:
        to = validate.address(body["to"], "to")
        from_value = body.get("from")
        if not from_value:
            raise mail_errors.InvalidValue("from", "required")
        validate.sender(from_value)
        reply_to = body.get("reply_to")
        if reply_to:
            validate.sender(reply_to, "reply_to")
        headers = transactional.headers(body.get("headers"))
        tags = transactional.tags(body.get("tags"))
        category = transactional.category(body.get("category"))
    except mail_errors.InvalidValue as exc:
        raise errors.InvalidBody(str(exc)) from None
    key = body.get("idempotency_key")
    if key is not None and not 1 <= len(key) <= MAX_KEY:
        raise errors.InvalidBody(f"idempotency_key: 1 to {MAX_KEY} characters")
    return {"to": to, "from": from_value, "reply_to": reply_to or None, "key": key,
            "category": category, "headers": json.dumps(headers), "tags": json.dumps(tags)}


async def _content(request: Request, account: str,
                   body: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(subject, text, html): given, or the template rendered with data under the render
    budget in the API's render pool; raises InvalidBody."""
    if body.get("template") is None:
        if body.get("data") is not None:
            raise errors.InvalidBody("data: only with a template")
        subject = body.get("subject")
        if not subject or not subject.strip():
            raise errors.InvalidBody("subject: required (or a template)")
        if body.get("text") is None and body.get("html") is None:
            raise errors.InvalidBody("text or html: one is required (or a template)")
        return subject, body.get("text"), body.get("html")
    for name in ("subject", "text", "html"):
        if name in body:
            raise errors.InvalidBody(f"{name}: give it in the template, not beside it")
    tpl = http.fields(body["template"], "template", TEMPLATE, TEMPLATE_OPTIONAL)
    if tpl.get("text") is None and tpl.get("html") is None:
        raise errors.InvalidBody("template: text or html is required")
    data = body.get("data") or {}
    if len(json.dumps(data)) > MAX_DATA_BYTES:
        raise errors.InvalidBody(f"data: at most {MAX_DATA_BYTES} bytes of JSON")
    try:
        out: tuple[str, str | None, str | None] = await renderpool.one(
            rendering.pool(request), account, "message",
            (tpl["subject"], tpl.get("text"), tpl.get("html")), data)
    except mail_errors.RenderError as exc:
        raise errors.InvalidBody(f"template: {exc}") from None
    if not out[0].strip():
        raise errors.InvalidBody("template: the subject renders empty")
    return out


async def create(request: Request) -> Response:
    """Queue one message: 202 {"id", "status"}; the same idempotency key again: 200 with
    the first message (never a second send)."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body", {"to": http.STRING},
                       BODY_OPTIONAL)
    params = _checked(body)
    pool = context.pool(request)
    if params["key"] is not None:  # answered before any render: a retry costs nothing
        found = await db.one(pool, "message_get_key", {"account": who.account,
                                                       "key": params["key"]})
        if found is not None:
            return http.Json(item(dict(found)), status_code=200)
    allowed = await db.one(pool, "account_senders", {"account": who.account})
    refusal = sql_senders.refusal(params["from"], list(allowed["senders"]) if allowed else [])
    if refusal:
        raise errors.InvalidBody(refusal)
    subject, text, html = await _content(request, who.account, body)
    try:
        row = await db.one(pool, "message_send", {
            "account": who.account, "subject": subject, "text": text, "html": html,
            "notify": False, **params})
    except psycopg.errors.InvalidParameterValue as exc:
        raise errors.InvalidBody(exc.diag.message_primary or str(exc)) from None
    assert row is not None
    if row["created"] and row["status"] == "queued":  # no NOTIFY in its commit: wake after
        request.app.state.waker.request()
    if not row["created"]:  # the same key, committed meanwhile by another request
        found = await db.one(pool, "message_get", {"id": row["id"], "account": who.account})
        assert found is not None
        return http.Json(item(dict(found)), status_code=200)
    return http.Json({"id": str(row["id"]), "status": row["status"]}, status_code=202)


async def get(request: Request) -> Response:
    """One message's status, attempts, error, provider id, times and feedback."""
    who = auth.principal(request)
    try:
        mid = uuid.UUID(request.path_params["id"])
    except ValueError:
        raise errors.NotFound(NO_MESSAGE) from None
    row = await db.one(context.pool(request), "message_get", {"id": mid,
                                                              "account": who.account})
    if row is None:
        raise errors.NotFound(NO_MESSAGE)
    return http.Json(item(dict(row)))
