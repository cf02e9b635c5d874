"""GET /broadcasts/{id}/preview: the message one contact of the account would receive."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from api import auth, context, db, errors, http
from api import unsubscribe as unsubscribe_routes
from mail import errors as mail_errors
from mail import message, preview


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

    def render() -> dict[str, Any]:
        content = message.Content(
            str(row["id"]), row["account"], row["subject"], row["from_address"],
            row["text_body"], row["html_body"], keys=keys,
            base_url=unsubscribe_routes.configured_url(), inert=True)
        return preview.of(content, contact)

    try:  # compiling and rendering are CPU work (bounded): off the event loop
        return http.Json(await asyncio.to_thread(render))
    except (mail_errors.RenderError, mail_errors.InvalidValue) as exc:
        raise errors.InvalidBody(str(exc)) from None

