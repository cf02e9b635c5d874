"""Issue 23 item 7: NUL in a query parameter, a path parameter or a cursor is bad input."""

from __future__ import annotations

import base64

import anyio
import psycopg
import pytest

from pgcast.api import db as api_db
from pgcast.api import errors
from tests.integration import test_api_helpers as h


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


NUL_CONTACT = _b64(b"a\x00b")
NUL_AT = _b64(b"2026-01-01T00:00:00+00:00\x00|x")
NUL_ID = _b64(b"2026-01-01T00:00:00+00:00|\x00")


def test_nul_anywhere_in_the_url_is_bad_input_not_a_500(api: h.Api) -> None:
    r = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com",
                                      "text": "Hello"})
    assert r.status_code == 201, r.text
    bid = r.json()["id"]
    r = api.post("/contacts", json={"contacts": [{"email": "ann@example.com"}]})
    assert r.status_code == 200, r.text
    for path in ("/contacts?tag=a%00b",
                 f"/contacts?cursor={NUL_CONTACT}",
                 "/contacts?status=a%00b",
                 f"/broadcasts/{bid}/preview?contact=a%00b",
                 f"/broadcasts/{bid}/recipients?status=%00",
                 f"/broadcasts?cursor={NUL_AT}",
                 f"/broadcasts?cursor={NUL_ID}",
                 "/contacts/suppressed?reason=%00",
                 f"/broadcasts/{bid}/test?ids=1%00",
                 "/contacts?limit=1%00",
                 "/contacts?tag%00=x"):
        r = api.get(path)
        assert r.status_code in (400, 422), (path, r.status_code, r.text)
        assert r.json()["error"] in ("bad_parameter", "invalid_request"), (path, r.text)
    for path in ("/broadcasts/a%00b", f"/broadcasts/{bid}%00/progress", "/broadcasts/%00/audit"):
        r = api.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text)
    r = api.get("/u/a%00b?utm_source=%00")  # the token is the route's own check: its page
    assert r.status_code == 400 and "Invalid link" in r.text


@pytest.mark.parametrize("value", ["a\x00b", "\ud800", ["ok", "x\x00"]])
def test_the_database_layer_refuses_what_postgres_cannot_hold(db_url: str, value: object) -> None:
    async def run() -> None:
        pool = api_db.make_pool(db_url, 1)
        await pool.open()
        try:
            with pytest.raises(errors.BadParameter):
                await api_db.one(pool, "contacts_page", {
                    "account": "acme", "tag": value, "status": None, "after": "", "limit": 1})
            assert await api_db.one(pool, "contacts_page", {  # the connection is still good
                "account": "acme", "tag": "fine ✓", "status": None, "after": "",
                "limit": 1}) is None
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):  # the server's own
                await api_db.one(pool, "api_broadcast_status", {"account": "a", "id": "x"})
        finally:
            await pool.close()

    anyio.run(run)
