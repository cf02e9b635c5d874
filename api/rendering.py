"""The API's render pool: previews and the trial render at create/edit, off the event loop,
under the render budget, an account holding at most its share of the render processes."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request

from pgcast.api import errors
from pgcast.mail import errors as mail_errors
from pgcast.mail import renderpool


def pool(request: Request) -> renderpool.RenderPool:
    """The app's render pool (opened by the lifespan)."""
    found: renderpool.RenderPool = request.app.state.render_pool
    return found


async def preview(request: Request, account: str, kwargs: dict[str, Any],
                  contact: dict[str, Any] | None) -> dict[str, Any]:
    """mail.preview.of for message.Content(**kwargs), rendered in the pool; 422 when it
    cannot be built (a budget it went over is named)."""
    spec = renderpool.Spec(uuid.uuid4().hex, account, kwargs)
    try:
        result: dict[str, Any] = await renderpool.one(pool(request), account, "preview", spec,
                                                      contact)
    except mail_errors.RenderError as exc:
        raise errors.InvalidBody(str(exc)) from None
    return result


async def trial(request: Request, account: str, subject: str, from_address: str,
                text: str | None, html: str | None) -> None:
    """Refuse (422) a broadcast whose trial render for a sample contact exceeds the budget."""
    try:
        await renderpool.one(pool(request), account, "trial",
                             (subject, from_address, text, html), None)
    except mail_errors.RenderError as exc:
        raise errors.InvalidBody(str(exc)) from None
