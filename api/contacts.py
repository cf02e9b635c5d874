"""Contacts: bulk upsert with per-item rejections, and unsubscribe."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from pgcast.api import auth, context, db, errors, http
from pgcast.mail import errors as mail_errors
from pgcast.mail import validate as validate_mail
from pgcast.sql import contacts
from pgcast.sql import errors as sql_errors

MAX_PER_CALL = 10_000  # contacts in one POST /contacts
PAGE_DEFAULT = 100
PAGE_MAX = 1000
ITEM_FIELDS = {"email": http.STRING}
ITEM_OPTIONAL = {"name": http.STRING_OR_NULL, "tags": http.ARRAY_OR_NULL,
                 "attributes": http.OBJECT_OR_NULL}


def _checked(raw: bytes) -> tuple[str, list[dict[str, Any]], list[tuple[int, str]]]:
    """The body parsed and every item validated: (rows as JSON, rejected items, and the
    (index, address) of each row).

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
    return json.dumps(batch.rows), rejected, [(r["where"], r["email"]) for r in batch.rows]


async def upsert(request: Request) -> Response:
    """POST /contacts: upsert valid items, report each invalid one with its index (an erased
    address among them)."""
    who = auth.principal(request)
    rows, rejected, keys = await http.off_loop(_checked, await http.read_body(request))
    upserted = 0
    if keys:
        written = await db.all_rows(context.pool(request), "contacts_upsert",
                                    {"account": who.account, "rows": rows, "replace": False})
        upserted = len(written)
        if upserted < len(keys):
            kept = {r["email"].lower() for r in written}
            rejected = sorted(rejected + [
                {"index": where, "email": email, "reason": contacts.ERASED_REASON}
                for where, email in keys if email.lower() not in kept], key=lambda r: r["index"])
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
    row = await db.one(context.pool(request), "contact_unsubscribe", {
        "account": who.account, "email": email, "source": "api", "actor": _actor(who)})
    if row is None:
        raise errors.NotFound("contact not found")
    return http.Json({"success": True, "email": row["email"],
                      "unsubscribed_at": row["unsubscribed_at"]})


# -- what an operator reaches for: list, resubscribe, erase -----------------------------------


def _encode_cursor(key: str) -> str:
    # the last address of the page (lower-cased): the caller has seen it, it reveals nothing
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        return base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_",
                                validate=True).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise errors.InvalidBody("cursor: not a cursor this API gave") from None


def contact_json(row: dict[str, Any]) -> dict[str, Any]:
    """A contact as listed."""
    return {"email": row["email"], "name": row["name"], "tags": row["tags"],
            "attributes": row["attributes"], "status": contacts.status_of(row),
            "unsubscribed_at": row["unsubscribed_at"],
            "suppressed_reason": row["suppressed_reason"], "created_at": row["created_at"]}


async def list_page(request: Request) -> Response:
    """GET /contacts: by address, keyset-paged, optionally by tag and status."""
    who = auth.principal(request)
    status = request.query_params.get("status") or None
    if status is not None and status not in contacts.STATUSES:
        raise errors.InvalidBody(f"status must be one of {', '.join(contacts.STATUSES)}")
    limit = http.query_int(request, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
    cursor = request.query_params.get("cursor")
    after = _decode_cursor(cursor) if cursor else ""
    rows = await db.all_rows(context.pool(request), "contacts_page", {
        "account": who.account, "tag": request.query_params.get("tag") or None,
        "status": status, "after": after, "limit": limit + 1})
    more = len(rows) > limit
    rows = rows[:limit]
    return http.Json({"contacts": [contact_json(r) for r in rows],
                      "next_cursor": _encode_cursor(rows[-1]["key"]) if more else None})


def _actor(who: auth.Principal) -> str:
    return json.dumps({"via": "api", "sub": who.sub}, ensure_ascii=False)


async def resubscribe(request: Request) -> Response:
    """POST /contacts/resubscribe: clear an unsubscribe, recorded in contact_events."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body", {"email": http.STRING})
    row = await db.one(context.pool(request), "contact_resubscribe", {
        "account": who.account, "email": body["email"].strip(), "source": "api",
        "actor": _actor(who)})
    if row is None:
        raise errors.NotFound("contact not found")
    message = "Resubscribed" if row["changed"] else "Was not unsubscribed; nothing changed"
    if row["suppressed"]:
        message += "; still suppressed (bounce or complaint): not mailable"
    return http.Json({"success": True, "email": row["email"], "resubscribed": row["changed"],
                      "suppressed": row["suppressed"], "message": message})


async def erase(request: Request) -> Response:
    """POST /contacts/erase: the right to erasure; the address's hash refuses a re-import."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body", {"email": http.STRING})
    email = body["email"].strip()
    if not email or len(email) > 1000:
        raise sql_errors.InvalidInput("email: give the address to erase")
    with contextlib.suppress(mail_errors.InvalidValue):  # stored addresses are normalized
        email = validate_mail.address(email)
    row = await db.one(context.pool(request), "contact_erase", {
        "account": who.account, "email": email, "source": "api", "actor": _actor(who)})
    assert row is not None
    found = row["contact_id"] is not None
    return http.Json({"success": True, "erased": found, "recipient_rows": row["recipients"],
                      "message": ("Erased from the contact and its recipient rows" if found
                                  else "No such contact; the address will be refused at "
                                       "import")})
