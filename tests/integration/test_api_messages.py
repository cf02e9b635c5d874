"""POST /messages and GET /messages/{id} (issue 26), through the real app and Postgres."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg

from pgcast.sql.queries import QUERIES
from tests import support
from tests.integration import test_api_helpers as h
from tests.integration import test_messages as tm

Conn = psycopg.Connection[dict[str, Any]]
BASE = {"to": "ann@example.com", "from": "Shop <shop@example.com>", "subject": "Receipt",
        "text": "Thanks!"}


def test_post_queues_and_the_same_key_answers_the_first(api: h.Api, conn: Conn, db_url: str,
                                                         tmp_path: Path) -> None:
    r = api.post("/messages", json={**BASE, "idempotency_key": "order-1",
                                    "headers": {"X-Entity-Ref-ID": "o1"},
                                    "tags": {"kind": "receipt"}, "reply_to": "help@example.com"})
    assert r.status_code == 202, r.text
    first = r.json()
    assert first["status"] == "queued" and set(first) == {"id", "status"}
    again = api.post("/messages", json={**BASE, "subject": "Changed", "idempotency_key": "order-1"})
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    assert again.json()["subject"] == "Receipt"
    assert conn.execute("SELECT count(*) AS n FROM messages").fetchone() == {"n": 1}
    tm.deliver(db_url, tmp_path)
    got = api.get(f"/messages/{first['id']}").json()
    assert got["status"] == "sent" and got["attempts"] == 1 and got["provider_message_id"]
    assert got["category"] == "transactional" and got["sent_at"] and got["handed_at"]
    eml = (tmp_path / "messages" / f"{first['id']}.eml").read_text()
    assert "X-Entity-Ref-ID: o1" in eml and "Reply-To: help@example.com" in eml
    assert "Subject: Receipt" in eml


def test_another_account_cannot_see_a_message(api: h.Api) -> None:
    mid = api.post("/messages", json=BASE).json()["id"]
    assert api.get(f"/messages/{mid}", headers=h.auth("other")).status_code == 404
    assert api.get("/messages/not-a-uuid").status_code == 404


def test_a_template_is_rendered_with_data(api: h.Api, conn: Conn) -> None:
    r = api.post("/messages", json={
        "to": "ann@example.com", "from": "shop@example.com",
        "template": {"subject": "Order {{ data.order }}", "text": "Hi {{ data.name }}"},
        "data": {"order": 42, "name": "Ann"}})
    assert r.status_code == 202, r.text
    row = conn.execute("SELECT subject, text_body FROM messages").fetchone()
    assert row == {"subject": "Order 42", "text_body": "Hi Ann"}


def test_clear_422s(api: h.Api, conn: Conn) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({**BASE, "to": "nope"}, "to:"),
        ({k: v for k, v in BASE.items() if k != "from"}, "from: required"),
        ({**BASE, "text": None}, "text or html"),
        ({**BASE, "headers": {"Bcc": "x@example.com"}}, "'Bcc' may not be set"),
        ({**BASE, "headers": {"X-Pgcast-Message": "x"}}, "may not be set"),
        ({**BASE, "tags": {"a b": "c"}}, "tags:"),
        ({**BASE, "category": "urgent"}, "category:"),
        ({**BASE, "template": {"subject": "x", "text": "y"}}, "give it in the template"),
        ({"to": "ann@example.com", "from": "shop@example.com",
          "template": {"subject": "{% for x in y %}", "text": "t"}}, "template:"),
        ({**BASE, "data": {"a": 1}}, "data: only with a template"),
        ({**BASE, "idempotency_key": ""}, "idempotency_key"),
        ({**BASE, "surprise": 1}, "unknown field"),
    ]
    for body, why in cases:
        r = api.post("/messages", json=body)
        assert r.status_code == 422, (body, r.text)
        assert why in r.json()["message"], (body, r.text)
    conn.execute("INSERT INTO senders (account, sender) VALUES ('acme', 'example.org')")
    r = api.post("/messages", json=BASE)
    assert r.status_code == 422 and "not a sender this account may use" in r.json()["message"]
    assert conn.execute("SELECT count(*) AS n FROM messages").fetchone() == {"n": 0}


def test_openapi_documents_the_routes(api: h.Api) -> None:
    doc = api.get("/openapi.json").json()
    assert set(doc["paths"]["/messages"]) == {"post"}
    assert set(doc["paths"]["/messages/{id}"]) == {"get"}


def test_post_wakes_the_loops_after_its_commit_never_in_it(api: h.Api, conn: Conn,
                                                             db_url: str) -> None:
    """POST /messages commits without a NOTIFY (one would serialise concurrent requests'
    commits) and the process's Waker sends one after the commit; a repeated key wakes
    nobody. The CLI and SQL's stable function still NOTIFY in the commit."""
    with support.connect(db_url) as listener:
        listener.execute("LISTEN pgcast_control")
        r = api.post("/messages", json={**BASE, "idempotency_key": "k-1"})
        assert r.status_code == 202
        notes = list(listener.notifies(timeout=10.0, stop_after=1))
        assert [n.payload for n in notes] == ['{"event" : "message"}']
        # the Waker counts its wake-up once the statement has returned, just after the NOTIFY
        deadline = time.monotonic() + 10
        while api.app.state.waker.sent == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert api.app.state.waker.sent == 1
        assert api.post("/messages", json={**BASE, "idempotency_key": "k-1"}).status_code == 200
        assert list(listener.notifies(timeout=1.0)) == []
        assert api.app.state.waker.sent == 1
        # in its own commit, the message_send block sends none when told not to
        conn.execute(QUERIES["message_send"], {
            "account": h.ACCOUNT, "to": "cy@example.com", "subject": "s", "text": "t",
            "html": None, "from": "shop@example.com", "key": None, "category": "transactional",
            "reply_to": None, "headers": "{}", "tags": "{}", "notify": False})
        assert list(listener.notifies(timeout=1.0)) == []
        conn.execute(QUERIES["message_send"], {
            "account": h.ACCOUNT, "to": "di@example.com", "subject": "s", "text": "t",
            "html": None, "from": "shop@example.com", "key": None, "category": "transactional",
            "reply_to": None, "headers": "{}", "tags": "{}", "notify": True})
        assert len(list(listener.notifies(timeout=10.0, stop_after=1))) == 1
