"""The dashboard's page and its routes through the real app on a real Postgres."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from pgcast.api import dashboard_routes
from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT


def test_the_page_loads_without_a_token_under_a_strict_csp(db_url: str) -> None:
    with h.client(db_url) as c:
        page = c.get("/")
        script = c.get("/static/app.js")
        missing = c.get("/static/nope.js")
        data = c.get("/broadcasts")
        traversal = c.get("/static/../app.py")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "<script" in page.text and "http" not in page.text.replace("http-equiv", "")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.headers["content-security-policy"] == csp
    assert missing.status_code == 404
    assert data.status_code == 401  # the page is public; the data is not
    assert traversal.status_code in (401, 404)


def test_no_file_of_the_page_asks_for_anything_outside(db_url: str) -> None:
    # offline: no URL with a scheme or protocol-relative host in any file of the page
    for f in dashboard_routes.STATIC_DIR.iterdir():
        text = f.read_text()
        for needle in ("http://", "https://", "//cdn", "innerHTML", "outerHTML",
                       "insertAdjacentHTML", "document.write", "eval("):
            assert needle not in text.replace('xmlns="http://www.w3.org/2000/svg"', ""), (
                f.name, needle)


def test_audit_log_lists_every_transition_of_own_broadcasts_only(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 3, account=A)
    bid = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com",
                                        "text": "Hello"}).json()["id"]
    assert api.post(f"/broadcasts/{bid}/send").status_code == 200
    assert api.post(f"/broadcasts/{bid}/pause").status_code == 200
    r = api.get(f"/broadcasts/{bid}/audit")
    assert r.status_code == 200
    log = r.json()["audit_log"]
    assert [(e["action"], e["to"]) for e in log] == [
        ("create", "draft"), ("send", "sending"), ("pause", "paused")]
    assert log[-1]["details"]["sub"] == "tester"
    other = api.get(f"/broadcasts/{bid}/audit", headers=h.auth("someone-else"))
    unknown = api.get(f"/broadcasts/{uuid.uuid4()}/audit")
    assert other.status_code == unknown.status_code == 404
    assert other.json() == unknown.json()


def test_audience_counts_what_a_send_would_snapshot(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 5, account=A, tag="vip")
    support.seed_contacts(conn, 4, account=A, start=100)
    support.seed_contacts(conn, 7, account="someone-else", tag="vip")
    conn.execute("UPDATE contacts SET unsubscribed_at = now() WHERE email = 'user1@example.com'")
    conn.execute("UPDATE contacts SET suppressed_at = now(), suppressed_reason = 'bounce' "
                 "WHERE email = 'user2@example.com' AND account = %s", (A,))
    vip = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com",
                                        "text": "Hello", "tag": "vip"}).json()["id"]
    everyone = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com",
                                             "text": "Hello"}).json()["id"]
    assert api.get(f"/broadcasts/{vip}/audience").json() == {
        "status": "draft", "tag": "vip", "audience": 3}
    assert api.get(f"/broadcasts/{everyone}/audience").json()["audience"] == 7
    assert api.get(f"/broadcasts/{vip}/audience",
                   headers=h.auth("someone-else")).status_code == 404


def test_import_upserts_valid_rows_and_reports_the_others_by_line(api: h.Api,
                                                                  conn: Conn) -> None:
    csv = ("email,name,tags\n"
           "a@example.com,Ann,vip;news\n"
           "not-an-address,Bob,\n"
           "C@Example.com,Cy,\n")
    r = api.post("/contacts/import", content=csv.encode(),
                 headers={"Content-Type": "text/csv; charset=utf-8"})
    assert r.status_code == 200, r.text
    assert r.json()["imported"] == 2
    assert [(x["line"], x["email"]) for x in r.json()["rejected"]] == [(3, "not-an-address")]
    rows = conn.execute("SELECT email, name, tags FROM contacts WHERE account = %s ORDER BY 1",
                        (A,)).fetchall()
    assert [(x["email"], x["name"], x["tags"]) for x in rows] == [
        ("C@example.com", "Cy", []), ("a@example.com", "Ann", ["vip", "news"])]


def test_import_reads_the_charset_the_content_type_names(api: h.Api, conn: Conn) -> None:
    body = "email,name\nzoe@example.com,Zoë Ångström\n".encode("latin-1")
    r = api.post("/contacts/import", content=body,
                 headers={"Content-Type": 'text/csv; charset="ISO-8859-1"'})
    assert r.status_code == 200 and r.json() == {"imported": 1, "rejected": []}
    assert conn.execute("SELECT name FROM contacts").fetchone() == {"name": "Zoë Ångström"}


def test_import_refuses_other_media_types_bad_files_and_oversized_bodies(
        api: h.Api, conn: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    r = api.post("/contacts/import", json={"contacts": []})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    r = api.post("/contacts/import", content=b"name,tags\nAnn,\n",
                 headers={"Content-Type": "text/csv"})
    assert r.status_code == 422
    assert r.json()["message"] == "the CSV body: the header must name an 'email' column"
    r = api.post("/contacts/import", content=b"email\nok@example.com\n\xff@example.com\n",
                 headers={"Content-Type": "text/csv"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"  # a file-level error
    # the advice names what an HTTP client can set, not a CLI flag
    assert "Content-Type: text/csv; charset=latin-1" in r.json()["message"]
    assert "--encoding" not in r.json()["message"]
    r = api.post("/contacts/import", content=b"email\nx@example.com\n",
                 headers={"Content-Type": "text/csv; charset=klingon"})
    assert r.status_code == 422 and r.json()["message"] == "charset: unknown encoding 'klingon'"
    monkeypatch.setattr(dashboard_routes, "MAX_IMPORT_BYTES", 64)
    r = api.post("/contacts/import", content=b"email\n" + b"x@example.com\n" * 10,
                 headers={"Content-Type": "text/csv"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    assert conn.execute("SELECT count(*) AS n FROM contacts").fetchone() == {"n": 0}
    r = api.post("/contacts/import", content=b"email\nx@example.com\n",
                 headers={"Content-Type": "text/csv", "Authorization": "Bearer nope"})
    assert r.status_code == 401
