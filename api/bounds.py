"""ASGI middleware: no request body larger than the largest route limit is ever taken in.

Each route reads its body through api.http.chunks with its own limit; this is the backstop
under all of them, for a route that would read a body some other way: a declared
Content-Length over MAX_REQUEST_BYTES is answered 413 before anything is read, and a
chunked body is cut off (BodyTooLarge, 413) as soon as it passes it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgcast.api import errors, http

MAX_REQUEST_BYTES = 64 * 1024 * 1024  # the largest body any route takes (a CSV import)


class BoundedBody:
    """Refuses request bodies over `limit` bytes while they stream."""

    def __init__(self, app: ASGIApp, limit: int = MAX_REQUEST_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Wrap receive with a byte count; answer 413 at once for a declared oversize."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        too_large = errors.BodyTooLarge(f"the body is larger than {self.limit} bytes")
        try:
            declared = http.declared_length(headers)
        except errors.ApiError as exc:
            await http.Json(exc.body(), status_code=exc.status_code)(scope, receive, send)
            return
        if declared is not None and declared > self.limit:
            await http.Json(too_large.body(), status_code=413,
                            headers={"Connection": "close"})(scope, receive, send)
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return message

        await self.app(scope, bounded, send)
