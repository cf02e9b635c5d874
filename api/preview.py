"""GET /broadcasts/{id}/preview: the message one contact of the account would receive."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from pgcast.api import auth, context, db, errors, http, rendering
from pgcast.api import unsubscribe as unsubscribe_routes


async def show(request: Request) -> Response:
    """The rendered subject, text, html and headers (a sample contact without ?contact=)."""
    who = auth.principal(request)
    bid = context.broadcast_id(request)
    pool = context.pool(request)
    row = await db.one(pool, "preview_broadcast", {"account": who.account, "id": bid})
    if row is None:
        raise errors.NotFound(context.NO_BROADCAST)
    email = request.query_params.get("contact")
    contact: dict[str, Any] | None = await db.one(pool, "preview_contact", {
        "account": who.account, "email": email.strip() if email is not None else None})
    if contact is None and email is not None:
        raise errors.NotFound("contact not found")
    keys = await unsubscribe_routes.keys(request)

    # compiled and rendered in a render process, under the budget, within the account's share
    return http.Json(await rendering.preview(request, who.account, {
        "broadcast_id": str(row["id"]), "account": row["account"], "subject": row["subject"],
        "from_address": row["from_address"], "text": row["text_body"], "html": row["html_body"],
        "keys": keys, "base_url": unsubscribe_routes.configured_url(), "inert": True},
        contact))
