"""Every route through the real app on a real Postgres; assertions on the rows."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from pgcast.api import app as api_app
from pgcast.api import openapi
from pgcast.mail import template
from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT


def create(api: h.Api, **body: Any) -> dict[str, Any]:
    r = api.post("/broadcasts", json={"subject": "Hi", "from": "News <news@example.com>",
                                      "text": "Hello", **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_healthz_needs_no_token_and_checks_the_database(db_url: str) -> None:
    with h.client(db_url) as c:
        r = c.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_contacts_upsert_reports_invalid_items_by_index(api: h.Api, conn: Conn) -> None:
    r = api.post("/contacts", json={"contacts": [
        {"email": "a@example.com", "name": "A", "tags": ["vip"]},
        {"email": "not an address"},
        {"email": "B@Example.com", "tags": None, "name": None},
        {"email": "a@example.com", "name": "A again"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["upserted"] == 2
    assert [(x["index"], x["email"]) for x in body["rejected"]] == [(1, "not an address")]
    rows = conn.execute("SELECT account, email, name, tags FROM contacts ORDER BY email").fetchall()
    assert [(x["account"], x["email"], x["name"]) for x in rows] == [
        (A, "B@example.com", ""), (A, "a@example.com", "A again")]


def test_contacts_structural_errors_are_422_and_write_nothing(api: h.Api, conn: Conn) -> None:
    for body in ({"contacts": [{"email": 5}]}, {"contacts": [{"email": "a@x.com", "age": 3}]},
                 {"contacts": "a@x.com"}, {}, {"contacts": [], "more": 1}, [1, 2],
                 {"contacts": [{"email": "a@x.com", "name": "nul\u0000"}]}):
        r = api.post("/contacts", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"] == "invalid_request" and r.json()["message"]
    r = api.post("/contacts", json={"contacts": [{"email": f"u{i}@x.com"} for i in range(10_001)]})
    assert r.status_code == 422 and "10000" in r.json()["message"]
    r = api.post("/contacts", content=b'{"contacts": [',
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    assert conn.execute("SELECT count(*) AS n FROM contacts").fetchone() == {"n": 0}


def test_unsubscribe(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 2, account=A)
    r = api.post("/contacts/unsubscribe", json={"email": "USER1@example.com"})
    assert r.status_code == 200 and r.json()["success"] is True
    r = api.post("/contacts/unsubscribe", json={"email": "nobody@example.com"})
    assert r.status_code == 404
    support.seed_contacts(conn, 1, account="other", start=5)
    r = api.post("/contacts/unsubscribe", json={"email": "user5@example.com"})
    assert r.status_code == 404
    rows = conn.execute("SELECT email FROM contacts WHERE unsubscribed_at IS NOT NULL").fetchall()
    assert rows == [{"email": "user1@example.com"}]
    assert api.post("/contacts/unsubscribe", json={"email": "user1@example.com"}
                    ).status_code == 200  # again: nothing more is recorded
    events = conn.execute("SELECT account, action, source, actor->>'via' AS via "
                          "FROM contact_events").fetchall()
    assert events == [{"account": A, "action": "unsubscribe", "source": "api", "via": "api"}]


def test_create_get_list_patch_delete_a_draft(api: h.Api, conn: Conn) -> None:
    b = create(api, tag="vip")
    assert b["status"] == "draft" and b["from"] == "News <news@example.com>" and b["tag"] == "vip"
    # create and edit answers add "warnings" (content/no unsubscribe link) to the broadcast
    assert b.pop("warnings") == [template.NO_UNSUBSCRIBE_LINK]
    assert api.get(f"/broadcasts/{b['id']}").json() == b
    r = api.patch(f"/broadcasts/{b['id']}", json={"subject": "New", "html": "<p>x</p>",
                                                   "text": None, "tag": None})
    assert r.status_code == 200, r.text
    assert (r.json()["subject"], r.json()["text"], r.json()["html"], r.json()["tag"]) == (
        "New", None, "<p>x</p>", None)
    # text and html cannot both go
    r = api.patch(f"/broadcasts/{b['id']}", json={"html": None})
    assert r.status_code == 422 and "text or html" in r.json()["message"]
    assert api.patch(f"/broadcasts/{b['id']}", json={}).status_code == 422
    assert api.delete(f"/broadcasts/{b['id']}").status_code == 204
    assert api.get(f"/broadcasts/{b['id']}").status_code == 404
    assert conn.execute("SELECT count(*) AS n FROM broadcasts").fetchone() == {"n": 0}


def test_create_validation(api: h.Api, conn: Conn) -> None:
    bad = [{"subject": "Hi", "from": "news@example.com"},  # no content
           {"subject": "", "from": "news@example.com", "text": "x"},
           {"subject": "a\nb", "from": "news@example.com", "text": "x"},
           {"subject": "Hi", "from": "nope", "text": "x"},
           {"subject": "Hi", "from": "news@example.com", "text": 3},
           {"subject": "Hi", "from": "news@example.com", "text": "x", "rate": 5},
           {"subject": "Hi", "text": "x"},
           *({"subject": "Hi", "from": "news@example.com", "text": "x", "priority": p}
             for p in (0, 11, True, "3", 2.5, None))]
    for body in bad:
        r = api.post("/broadcasts", json=body)
        assert r.status_code == 422, (body, r.text)
    assert conn.execute("SELECT count(*) AS n FROM broadcasts").fetchone() == {"n": 0}


def test_priority_is_set_at_create_and_edited_while_a_draft(api: h.Api, conn: Conn) -> None:
    assert create(api)["priority"] == 1
    b = create(api, priority=3)
    assert b["priority"] == 3
    r = api.patch(f"/broadcasts/{b['id']}", json={"priority": 10})
    assert (r.status_code, r.json()["priority"]) == (200, 10), r.text
    assert api.patch(f"/broadcasts/{b['id']}", json={"priority": 11}).status_code == 422
    row = conn.execute("SELECT priority FROM broadcasts WHERE id = %s", (b["id"],)).fetchone()
    assert row == {"priority": 10}


def test_list_is_newest_first_and_keyset_paged(api: h.Api, conn: Conn) -> None:
    ids = [create(api, subject=f"n{i}")["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        r = api.get("/broadcasts", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200
        seen += [b["id"] for b in r.json()["broadcasts"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert api.get("/broadcasts", params={"cursor": "garbage!"}).status_code == 422
    assert api.get("/broadcasts", params={"limit": 0}).status_code == 422


def test_transitions_and_409s(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 10, account=A)
    b = create(api)
    url = f"/broadcasts/{b['id']}"
    r = api.post(f"{url}/send")
    assert r.json() == {"success": True, "status": "sending", "queued": 10,
                        "message": "Broadcast queued for 10 recipients"}
    again = api.post(f"{url}/send")
    assert again.status_code == 409
    assert again.json() == {"success": False, "status": "sending",
                            "message": "Broadcast is sending; only a draft can be sent"}
    assert api.patch(url, json={"subject": "x"}).json()["status"] == "sending"
    assert api.delete(url).status_code == 409
    assert api.post(f"{url}/resume").status_code == 409
    assert api.post(f"{url}/pause").json() == {"success": True, "status": "paused",
                                                "message": "Paused (operator)"}
    assert api.post(f"{url}/resume").json()["status"] == "sending"
    r = api.post(f"{url}/cancel")
    assert r.json() == {"success": True, "status": "cancelled", "alreadyQueued": 0,
                        "message": "Cancelled — 0 emails were already handed to the provider"}
    r = api.post(f"{url}/resume")
    assert r.status_code == 409 and r.json()["status"] == "cancelled"
    assert api.post(f"{url}/cancel").status_code == 409
    row = conn.execute("SELECT status, audit_log FROM broadcasts").fetchone()
    assert row is not None and row["status"] == "cancelled"
    # every API action names the token's sub (issue 16); the send keeps its own details
    actions = [(e["action"], e["details"].get("via"), e["details"].get("sub"))
               for e in row["audit_log"]]
    assert actions == [(a, "api", "tester") for a in ("create", "send", "pause", "resume",
                                                       "cancel")]
    assert row["audit_log"][1]["details"]["recipients"] == 10
    assert support.assert_counters_true(conn, uuid.UUID(b["id"]))["cancelled"] == 10


def test_api_messages_equal_the_cli_ones(api: h.Api, conn: Conn) -> None:
    from pgcast.sql import broadcasts

    support.seed_contacts(conn, 3, account=A)
    bid = uuid.UUID(create(api)["id"])
    api.post(f"/broadcasts/{bid}/send")
    for action in ("send", "resume"):
        ours = api.post(f"/broadcasts/{bid}/{action}").json()
        assert ours == getattr(broadcasts, action)(conn, A, bid)
    api.post(f"/broadcasts/{bid}/cancel")
    for action in ("cancel", "pause"):
        ours = api.post(f"/broadcasts/{bid}/{action}").json()
        assert ours == getattr(broadcasts, action)(conn, A, bid)


def test_send_with_no_recipients_is_refused_unless_allowed(api: h.Api, conn: Conn) -> None:
    b = create(api, tag="nobody")
    r = api.post(f"/broadcasts/{b['id']}/send")
    assert r.status_code == 409
    assert r.json() == {"success": False, "status": "empty", "queued": 0, "message": (
        "Nobody to send to: no subscribed contact matches tag 'nobody'; nothing was sent "
        "(allow_empty sends it anyway)")}
    assert api.get(f"/broadcasts/{b['id']}").json()["status"] == "draft"
    for bad in ({"allow_empty": 1}, {"allow_empty": "yes"}, {"allow": True}):
        assert api.post(f"/broadcasts/{b['id']}/send", json=bad).status_code == 422
    r = api.post(f"/broadcasts/{b['id']}/send", json={"allow_empty": True})
    assert r.status_code == 200
    assert r.json()["queued"] == 0 and r.json()["status"] == "sent"
    p = api.get(f"/broadcasts/{b['id']}/progress").json()
    assert (p["status"], p["total"], p["eta_seconds"]) == ("sent", 0, 0)
    row = conn.execute("SELECT audit_log FROM broadcasts").fetchone()
    assert row is not None and row["audit_log"][-1]["details"]["sub"] == "tester"


def test_progress_is_the_row_counters(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 10, account=A)
    b = create(api)
    p = api.get(f"/broadcasts/{b['id']}/progress").json()
    assert p == {"status": "draft", "total": 0, "pending": 0, "sent": 0, "failed": 0,
                 "skipped": 0, "unknown": 0, "cancelled": 0, "rate": None, "eta_seconds": None,
                 "delivered": 0, "bounced": 0, "complained": 0, "scheduled_at": None,
                 "share_per_second": None, "unknown_resolved": 0, "unknown_requeued": 0,
                 "filter_used": None}
    api.post(f"/broadcasts/{b['id']}/send")
    conn.execute("UPDATE broadcasts SET sent = 4, failed = 1, started_at = now() - interval '5 s'")
    p = api.get(f"/broadcasts/{b['id']}/progress").json()
    assert (p["total"], p["pending"], p["sent"], p["failed"]) == (10, 5, 4, 1)
    assert 0.9 <= p["rate"] <= 1.0 and p["eta_seconds"] in (5, 6)


def test_recipients_are_keyset_paged_and_filtered(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 7, account=A)
    b = create(api)
    api.post(f"/broadcasts/{b['id']}/send")
    conn.execute("UPDATE broadcast_recipients SET status = 'failed', last_error = 'bounced', "
                 "worker = 'w' WHERE email IN ('user2@example.com', 'user5@example.com')")
    emails, cursor = [], None
    while True:
        r = api.get(f"/broadcasts/{b['id']}/recipients",
                    params={"limit": 3, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        emails += [x["email"] for x in r.json()["recipients"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert emails == [f"user{i}@example.com" for i in range(7)]
    r = api.get(f"/broadcasts/{b['id']}/recipients", params={"status": "failed"})
    assert [(x["email"], x["last_error"]) for x in r.json()["recipients"]] == [
        ("user2@example.com", "bounced"), ("user5@example.com", "bounced")]
    assert api.get(f"/broadcasts/{b['id']}/recipients", params={"status": "x"}).status_code == 422
    assert api.get(f"/broadcasts/{uuid.uuid4()}/recipients").status_code == 404


def test_unknown_and_malformed_ids_are_404(api: h.Api) -> None:
    for path in (f"/broadcasts/{uuid.uuid4()}", "/broadcasts/not-a-uuid"):
        for method, suffix in (("GET", ""), ("GET", "/progress"), ("GET", "/events"),
                               ("POST", "/send"), ("POST", "/cancel"), ("DELETE", "")):
            r = api.request(method, path + suffix)
            assert r.status_code == 404, (method, path + suffix)
            assert r.json() == {"error": "not_found", "message": "broadcast not found"}


def test_unknown_route_and_method_are_json(api: h.Api) -> None:
    assert api.get("/nope").json()["error"] == "not_found"
    r = api.put("/broadcasts")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    assert api.request("HEAD", "/broadcasts").status_code == 200


def test_openapi_documents_every_route(api: h.Api) -> None:
    r = api.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1") and doc == openapi.document()
    served = {(m.lower(), route.path) for route in api_app.ROUTES
              for m in (route.methods or ()) if m != "HEAD"}
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented


def test_unknown_or_repeated_query_parameters_are_422(api: h.Api, conn: Conn) -> None:
    for path in ("/broadcasts?limt=5", "/broadcasts?limit=5&limit=6",
                 f"/broadcasts/{uuid.uuid4()}/progress?x=1"):
        r = api.get(path)
        assert r.status_code == 422, (path, r.text)
        assert "query parameter" in r.json()["message"]
    assert api.get("/broadcasts?limit=5").status_code == 200
