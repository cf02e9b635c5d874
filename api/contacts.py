"""Contacts: bulk upsert with per-item rejections, and unsubscribe."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from api import auth, context, db, errors, http
from sql import contacts

MAX_PER_CALL = 10_000  # contacts in one POST /contacts
ITEM_FIELDS = {"email": http.STRING}
ITEM_OPTIONAL = {"name": http.STRING_OR_NULL, "tags": http.ARRAY_OR_NULL}


async def upsert(request: Request) -> Response:
    """POST /contacts: upsert valid items, report each invalid one with its index."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body", {"contacts": http.ARRAY})
    items: list[Any] = body["contacts"]
    if len(items) > MAX_PER_CALL:
        raise errors.InvalidBody(f"at most {MAX_PER_CALL} contacts per call (got {len(items)})")
    checked = [http.fields(item, f"body.contacts[{i}]", ITEM_FIELDS, ITEM_OPTIONAL)
               for i, item in enumerate(items)]
    for i, c in enumerate(checked):
        if any(not isinstance(t, str) for t in c.get("tags") or []):
            raise errors.InvalidBody(f"body.contacts[{i}].tags: must be an array of strings")
    batch = contacts.validate([(i, c["email"], c.get("name"), c.get("tags"))
                               for i, c in enumerate(checked)])
    upserted = 0
    if batch.rows:
        upserted = await db.rowcount(context.pool(request), "contacts_upsert",
                                     {"account": who.account, "rows": json.dumps(batch.rows)})
    rejected = [{"index": r.where, "email": r.email, "reason": r.reason} for r in batch.rejected]
    return http.Json({"upserted": upserted, "rejected": rejected})


async def unsubscribe(request: Request) -> Response:
    """POST /contacts/unsubscribe: effective at the next handoff of any running broadcast."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body", {"email": http.STRING})
    row = await db.one(context.pool(request), "contact_unsubscribe",
                       {"account": who.account, "email": body["email"].strip()})
    if row is None:
        raise errors.NotFound("contact not found")
    return http.Json({"success": True, "email": row["email"],
                      "unsubscribed_at": row["unsubscribed_at"]})
