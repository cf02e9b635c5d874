"""GET /contacts/suppressed and POST /contacts/unsuppress, scoped to the caller's account."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from pgcast.api import auth, context, cursors, db, errors, http
from pgcast.sql import errors as sql_errors
from pgcast.sql import feedback

PAGE_DEFAULT = 100
PAGE_MAX = 1000


async def suppressed(request: Request) -> Response:
    """GET /contacts/suppressed: keyset-paged by contact, optionally of one reason."""
    who = auth.principal(request)
    try:
        why = feedback.reason(request.query_params.get("reason"))
    except sql_errors.InvalidInput as exc:
        raise errors.InvalidBody(str(exc)) from None
    limit = http.query_int(request, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
    # sealed like the recipients' cursors: a contact id would tell how many contacts exist
    key, scope = context.settings(request).cursor_key, f"suppressed\0{who.account}\0{why}"
    raw = request.query_params.get("cursor")
    after = cursors.open_(key, scope, raw) if raw else 0
    rows = await db.all_rows(context.pool(request), "feedback_suppressed_page", {
        "account": who.account, "reason": why, "after": after, "limit": limit + 1})
    page = rows[:limit]  # one more was read: is there a next page?
    next_cursor = cursors.seal(key, scope, page[-1]["id"]) if len(rows) > limit else None
    return http.Json({"contacts": [feedback.item(r) for r in page], "next_cursor": next_cursor})


async def unsuppress(request: Request) -> Response:
    """POST /contacts/unsuppress: lift one contact's suppression (audited)."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body", {"email": http.STRING})
    email = body["email"].strip()
    row = await db.one(context.pool(request), "feedback_unsuppress", {
        "account": who.account, "email": email, "source": "api",
        "actor": json.dumps({"via": "api", "sub": who.sub})})
    try:
        result = feedback.unsuppress_result(dict(row) if row else None, who.account, email)
    except sql_errors.NotFound:
        raise errors.NotFound("contact not found") from None
    return http.Json(result, status_code=200 if result["success"] else 409)
