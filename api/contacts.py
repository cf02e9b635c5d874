"""Contacts: bulk upsert with per-item rejections, and unsubscribe."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from api import auth, context, db, errors, http
from mail import validate as validate_mail
from sql import contacts
from sql import errors as sql_errors

MAX_PER_CALL = 10_000  # contacts in one POST /contacts
ITEM_FIELDS = {"email": http.STRING}
ITEM_OPTIONAL = {"name": http.STRING_OR_NULL, "tags": http.ARRAY_OR_NULL,
                 "attributes": http.OBJECT_OR_NULL}


def _checked(raw: bytes) -> tuple[str, list[dict[str, Any]]]:
    """The body parsed and every item validated: (rows as JSON, rejected items).

    CPU-bound and linear in the body (every list is bounded before it is walked), so it runs
    in a worker thread: one 8 MiB body never holds up the other requests.
    """
    body = http.fields(http.parse_json(raw), "body", {"contacts": http.ARRAY})
    items: list[Any] = body["contacts"]
    if len(items) > MAX_PER_CALL:
        raise errors.InvalidBody(f"at most {MAX_PER_CALL} contacts per call (got {len(items)})")
    checked = [http.fields(item, f"body.contacts[{i}]", ITEM_FIELDS, ITEM_OPTIONAL)
               for i, item in enumerate(items)]
    for i, c in enumerate(checked):
        tags = c.get("tags") or []
        # a list over the bound is rejected by mail.validate.tags before any tag is read
        if len(tags) <= validate_mail.MAX_TAGS and any(not isinstance(t, str) for t in tags):
            raise errors.InvalidBody(f"body.contacts[{i}].tags: must be an array of strings")
    batch = contacts.validate([(i, c["email"], c.get("name"), c.get("tags"), c.get("attributes"))
                               for i, c in enumerate(checked)])
    rejected = [{"index": r.where, "email": r.email, "reason": r.reason} for r in batch.rejected]
    return json.dumps(batch.rows), rejected


async def upsert(request: Request) -> Response:
    """POST /contacts: upsert valid items, report each invalid one with its index."""
    who = auth.principal(request)
    rows, rejected = await http.off_loop(_checked, await http.read_body(request))
    upserted = 0
    if rows != "[]":
        upserted = await db.rowcount(context.pool(request), "contacts_upsert",
                                     {"account": who.account, "rows": rows})
    # 10,000 rejections render to megabytes of JSON: encoded in the thread too
    return await http.off_loop(http.Json, {"upserted": upserted, "rejected": rejected})


async def unsubscribe(request: Request) -> Response:
    """POST /contacts/unsubscribe: effective at the next handoff of any running broadcast."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body", {"email": http.STRING})
    try:  # bounded and checked like every stored address (422 naming the field)
        email = contacts.normalize_email(body["email"])
    except sql_errors.InvalidInput as exc:
        raise errors.InvalidBody(str(exc)) from None
    row = await db.one(context.pool(request), "contact_unsubscribe",
                       {"account": who.account, "email": email})
    if row is None:
        raise errors.NotFound("contact not found")
    return http.Json({"success": True, "email": row["email"],
                      "unsubscribed_at": row["unsubscribed_at"]})
