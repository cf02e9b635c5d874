"""Issue 23 item 9: /u/ pages cannot be framed, run nothing, and ignore tracking parameters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgcast.mail import unsubscribe
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
ONE_CLICK = {"content": b"List-Unsubscribe=One-Click",
             "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


@pytest.fixture
def public(db_url: str) -> Iterator[h.Api]:
    with h.client(db_url) as c:
        yield c


def _csp(value: str) -> dict[str, str]:
    return {d.split()[0]: d.strip() for d in value.split(";") if d.strip()}


def test_pages_send_a_strict_csp_and_ignore_unknown_query_parameters(
        api: h.Api, public: h.Api, conn: Conn) -> None:
    r = api.post("/contacts", json={"contacts": [{"email": "eve@example.com"}]})
    assert r.status_code == 200, r.text
    r = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com",
                                      "text": "{{ unsubscribe_url }}"})
    bid = r.json()["id"]
    cid = conn.execute("SELECT id FROM contacts").fetchone()["id"]  # type: ignore[index]
    secret = conn.execute("SELECT secret FROM unsubscribe_keys").fetchone()["secret"]  # type: ignore[index]
    token = unsubscribe.Keys((secret,)).make(h.ACCOUNT, cid, bid)
    answers = [public.get(f"/u/{token}?utm_source=x&utm_medium=email"),
               public.get(f"/u/{token}"),
               public.get("/u/forged-token-xyz?utm_source=x")]
    assert [a.status_code for a in answers] == [200, 200, 400]
    assert "Stop receiving" in answers[0].text
    for a in answers:
        csp = _csp(a.headers["content-security-policy"])
        assert csp["default-src"] == "default-src 'none'"
        assert csp["frame-ancestors"] == "frame-ancestors 'none'"
        assert csp["form-action"] == "form-action 'self'"
        assert "script-src" not in csp and "'unsafe-inline'" not in a.headers[
            "content-security-policy"]
        assert a.headers["x-frame-options"] == "DENY"
        assert a.headers["x-content-type-options"] == "nosniff"
        assert a.headers["content-type"].startswith("text/html")
    r = public.post(f"/u/{token}?utm_source=x", **ONE_CLICK)
    assert r.status_code == 200 and "You are unsubscribed" in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    row = conn.execute("SELECT unsubscribed_at FROM contacts").fetchone()
    assert row is not None and row["unsubscribed_at"] is not None
