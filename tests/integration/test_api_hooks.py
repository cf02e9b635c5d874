"""The outgoing webhooks' routes: add (secret once), list, rotate, deliveries, redeliver,
enable, delete; refusals with a clear 422; each account sees only its own."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]


def test_add_list_rotate_deliveries_redeliver_delete(api: h.Api, conn: Conn) -> None:
    r = api.post("/webhooks", json={"url": "https://hooks.example.com/in",
                                    "events": ["contact.unsubscribed", "broadcast.sent"]})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["secret"].startswith("whsec_") and created["enabled"] is True
    assert r.headers["location"] == f"/webhooks/{created['id']}"
    listed = api.get("/webhooks").json()["webhooks"]
    assert [w["id"] for w in listed] == [created["id"]]
    assert "secret" not in listed[0] and listed[0]["pending"] == 0
    # another account sees nothing of it
    other = api.get("/webhooks", headers=h.auth("someone-else")).json()
    assert other == {"webhooks": []}
    assert api.delete(f"/webhooks/{created['id']}",
                      headers=h.auth("someone-else")).status_code == 404

    rotated = api.post(f"/webhooks/{created['id']}/rotate-secret").json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    stored = conn.execute("SELECT secret FROM webhook_endpoints").fetchone()["secret"]
    assert stored == rotated["secret"]

    conn.execute("INSERT INTO contacts (account, email) VALUES ('acme', 'a@example.com')")
    api.post("/contacts/unsubscribe", json={"email": "a@example.com"})
    page = api.get(f"/webhooks/{created['id']}/deliveries").json()
    assert [d["event_type"] for d in page["deliveries"]] == ["contact.unsubscribed"]
    first = page["deliveries"][0]
    assert first["status"] == "pending" and first["attempts"] == 0
    again = api.post(f"/webhooks/{created['id']}/deliveries/{first['id']}/redeliver")
    assert again.status_code == 202
    assert again.json()["event_id"] == first["event_id"]
    assert len(api.get(f"/webhooks/{created['id']}/deliveries").json()["deliveries"]) == 2
    assert api.post(f"/webhooks/{created['id']}/deliveries/999999/redeliver"
                    ).status_code == 404
    assert api.post(f"/webhooks/{created['id']}/enable").json()["enabled"] is True

    assert api.delete(f"/webhooks/{created['id']}").status_code == 204
    assert api.get("/webhooks").json() == {"webhooks": []}
    assert conn.execute("SELECT count(*) AS n FROM webhook_deliveries").fetchone()["n"] == 0
    assert api.delete(f"/webhooks/{created['id']}").status_code == 404
    assert api.get("/webhooks/not-a-uuid/deliveries").status_code == 404


@pytest.mark.parametrize(("body", "message"), [
    ({"url": "http://hooks.example.com/", "events": ["*"]}, "must be https"),
    ({"url": "https://127.0.0.1/", "events": ["*"]}, "loopback"),
    ({"url": "https://10.0.0.1/", "events": ["*"]}, "private"),
    ({"url": "https://169.254.169.254/", "events": ["*"]}, "metadata"),
    ({"url": "https://[::1]/", "events": ["*"]}, "loopback"),
    ({"url": "https://localhost/", "events": ["*"]}, "localhost"),
    ({"url": "https://hooks.example.com/", "events": ["broadcast.nope"]}, "unknown event"),
    ({"url": "https://hooks.example.com/", "events": []}, "non-empty"),
    ({"url": "https://u:p@hooks.example.com/", "events": ["*"]}, "user or password"),
    ({"url": "ftp://hooks.example.com/", "events": ["*"]}, "must be https"),
])
def test_refused_with_a_clear_422(api: h.Api, body: dict[str, Any], message: str) -> None:
    r = api.post("/webhooks", json=body)
    assert r.status_code == 422, r.text
    assert message in r.text


def test_at_most_twenty_endpoints(api: h.Api) -> None:
    for i in range(20):
        assert api.post("/webhooks", json={"url": f"https://h{i}.example.com/",
                                           "events": ["*"]}).status_code == 201
    r = api.post("/webhooks", json={"url": "https://h.example.com/", "events": ["*"]})
    assert r.status_code == 422 and "at most 20" in r.text
