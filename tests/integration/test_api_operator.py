"""GET /contacts, POST /contacts/resubscribe, POST /contacts/erase: tenant-scoped, on real rows."""

from __future__ import annotations

from typing import Any

import psycopg

from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT


def test_contacts_are_listed_keyset_paged_filtered_and_scoped(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 5, account=A, tag="vip")
    support.seed_contacts(conn, 3, account="other")
    conn.execute("UPDATE contacts SET unsubscribed_at = now() WHERE account = %s "
                 "AND email = 'user1@example.com'", [A])
    seen, cursor = [], None
    while True:
        r = api.get("/contacts", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        seen += [c["email"] for c in body["contacts"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert "user" not in cursor  # opaque, though it holds nothing the caller has not seen
    assert seen == [f"user{i}@example.com" for i in range(5)]  # no other account's
    r = api.get("/contacts", params={"status": "unsubscribed"})
    assert [(c["email"], c["status"]) for c in r.json()["contacts"]] == [
        ("user1@example.com", "unsubscribed")]
    assert r.json()["next_cursor"] is None  # the last page says so
    assert api.get("/contacts", params={"tag": "nope"}).json()["contacts"] == []
    for bad in ({"status": "gone"}, {"limit": 0}, {"cursor": "%%%"}, {"color": "red"}):
        assert api.get("/contacts", params=bad).status_code == 422, bad


def test_resubscribe_records_the_token_subject(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 1, account=A)
    support.seed_contacts(conn, 1, account="other")
    api.post("/contacts/unsubscribe", json={"email": "user0@example.com"})
    r = api.post("/contacts/resubscribe", json={"email": "user0@example.com"})
    assert r.status_code == 200 and r.json()["resubscribed"] is True, r.text
    events = conn.execute("SELECT account, action, source, actor FROM contact_events "
                          "ORDER BY id").fetchall()
    assert events == [{"account": A, "action": action, "source": "api",
                       "actor": {"via": "api", "sub": "tester"}}
                      for action in ("unsubscribe", "resubscribe")]
    assert api.post("/contacts/resubscribe",
                    json={"email": "nobody@example.com"}).status_code == 404


def test_erase_scrubs_only_the_callers_contact_and_refuses_its_reimport(
        api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 2, account=A)
    support.seed_contacts(conn, 1, account="other")
    bid = support.new_broadcast(conn, account=A)
    r = api.post("/contacts/erase", json={"email": "user0@example.com"})
    assert r.status_code == 200, r.text
    assert (r.json()["erased"], r.json()["recipient_rows"]) == (True, 1)
    emails = {x["email"] for x in conn.execute(
        "SELECT email FROM contacts UNION ALL SELECT email FROM broadcast_recipients "
        "WHERE broadcast_id = %s", [bid]).fetchall()}
    assert "user0@example.com" in emails  # the other account's contact of that address
    assert conn.execute("SELECT count(*) AS n FROM contacts WHERE account = %s "
                        "AND email = 'user0@example.com'", [A]).fetchone() == {"n": 0}
    assert conn.execute("SELECT count(*) AS n FROM broadcast_recipients WHERE broadcast_id = %s "
                        "AND email = 'user0@example.com'", [bid]).fetchone() == {"n": 0}
    r = api.post("/contacts", json={"contacts": [{"email": "User0@example.com"},
                                                 {"email": "new@example.com"}]})
    assert r.json()["upserted"] == 1
    assert [(x["index"], x["reason"][:6]) for x in r.json()["rejected"]] == [(0, "erased")]
    # the erased contact is listed nowhere
    listed = [c["email"] for c in api.get("/contacts").json()["contacts"]]
    assert listed == ["new@example.com", "user1@example.com"]


def test_send_body_is_optional_and_checked(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 1, account=A)
    bid = support.new_broadcast(conn, account=A, send=False)
    for bad in ({"allow_empty": "yes"}, {"allowEmpty": True}, [True]):
        assert api.post(f"/broadcasts/{bid}/send", json=bad).status_code == 422, bad
    r = api.post(f"/broadcasts/{bid}/send", json={"allow_empty": False})
    assert r.status_code == 200 and r.json()["queued"] == 1, r.text


def test_a_send_that_matches_nobody_is_409_naming_the_segment_unless_allowed(
        api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 2, account=A, tag="vip")
    r = api.post("/broadcasts", json={"subject": "S", "from": "a@example.com", "text": "x",
                                      "tag": "vpi"})
    bid = r.json()["id"]
    r = api.post(f"/broadcasts/{bid}/send")
    assert r.status_code == 409, r.text
    assert (r.json()["status"], "'vpi'" in r.json()["message"]) == ("empty", True)
    assert conn.execute("SELECT status FROM broadcasts").fetchone() == {"status": "draft"}
    r = api.post(f"/broadcasts/{bid}/send", json={"allow_empty": True})
    assert r.status_code == 200 and r.json()["queued"] == 0, r.text
