"""Issue 23 item 6: every request body is bounded while it streams, on every route."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration import test_api_helpers as h

CHUNK = 64 * 1024  # bytes a client sends at a time
SENT = 40 * 1024 * 1024  # bytes an unbounded reader would take in
JSON_LIMIT = 8 * 1024 * 1024  # api.http.MAX_BODY_BYTES


class Upload:
    """A chunked body that counts what the app has read of it."""

    def __init__(self, total: int = SENT) -> None:
        self.total = total
        self.read = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        """Chunks of spaces (valid JSON whitespace), counted as the app pulls them."""
        while self.read < self.total:
            self.read += CHUNK
            yield b" " * CHUNK


def _routes(bid: str) -> list[tuple[str, str, int]]:
    # (method, path, the route's own limit in bytes)
    return [
        ("POST", f"/broadcasts/{bid}/retry", JSON_LIMIT),
        ("POST", f"/broadcasts/{uuid.uuid4()}/retry", JSON_LIMIT),  # an unknown id as well
        ("POST", f"/broadcasts/{bid}/send", JSON_LIMIT),
        ("POST", f"/broadcasts/{bid}/schedule", JSON_LIMIT),
        ("POST", f"/broadcasts/{bid}/test", JSON_LIMIT),
        ("PATCH", f"/broadcasts/{bid}", JSON_LIMIT),
        ("POST", "/broadcasts", JSON_LIMIT),
        ("POST", "/contacts", JSON_LIMIT),
        ("POST", "/contacts/unsubscribe", JSON_LIMIT),
        ("POST", "/u/not-a-token-but-long-enough", 1024),
    ]


def test_an_oversized_chunked_body_is_refused_before_it_is_all_read(api: h.Api) -> None:
    r = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com",
                                      "text": "Hello"})
    assert r.status_code == 201, r.text
    bid = r.json()["id"]
    for method, path, limit in _routes(bid):
        upload = Upload()
        r = api.request(method, path, content=upload.chunks(),
                        headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 413), (path, r.status_code, r.text)
        assert upload.read <= limit + 2 * CHUNK, (path, upload.read)


@pytest.mark.parametrize("path", ["/broadcasts", "/contacts/import", "/webhooks/ses"])
def test_a_declared_length_over_every_limit_is_refused_unread(api: h.Api, path: str) -> None:
    upload = Upload(CHUNK)
    headers: dict[str, Any] = {"Content-Type": "text/csv",
                               "Content-Length": str(65 * 1024 * 1024)}
    r = api.post(path, content=upload.chunks(), headers=headers)
    assert r.status_code == 413, r.text
    assert upload.read == 0


def test_the_backstop_takes_the_largest_route_limit() -> None:
    from pgcast.api import bounds, dashboard_routes, http, webhooks

    largest = max(dashboard_routes.MAX_IMPORT_BYTES, http.MAX_BODY_BYTES,
                  webhooks.MAX_BODY_BYTES)
    assert largest <= bounds.MAX_REQUEST_BYTES
