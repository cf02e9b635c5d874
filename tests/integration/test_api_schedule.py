"""The schedule, unschedule, retry and copy routes through the real app on a real Postgres."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg
import pytest

from pgcast.sql import schedule
from pgcast.sql.queries import QUERIES
from pgcast.worker import starter
from tests import support
from tests.integration import test_api_helpers as h
from tests.integration import test_dispatch as dispatch

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT


def iso(delta_seconds: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delta_seconds)).isoformat()


def draft(conn: Conn) -> uuid.UUID:
    return support.new_broadcast(conn, account=A, send=False)


def test_schedule_unschedule_and_edits_need_a_draft(api: h.Api, conn: Conn) -> None:
    bid = draft(conn)
    at = iso(3600)
    r = api.post(f"/broadcasts/{bid}/schedule", json={"at": at, "not_after": iso(7200)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["success"], body["status"]) == (True, "scheduled")
    assert dt.datetime.fromisoformat(body["scheduled_at"]) == dt.datetime.fromisoformat(at)
    listed = api.get("/broadcasts").json()["broadcasts"][0]
    assert (listed["status"], listed["scheduled_at"]) == ("scheduled", body["scheduled_at"])
    progress = api.get(f"/broadcasts/{bid}/progress").json()
    assert progress["scheduled_at"] == body["scheduled_at"]
    assert api.get(f"/broadcasts/{bid}").json()["not_after"] == body["not_after"]
    r = api.patch(f"/broadcasts/{bid}", json={"subject": "fixed before it starts"})
    assert (r.status_code, r.json()["status"]) == (200, "scheduled")
    assert r.json()["subject"] == "fixed before it starts"
    assert r.json()["scheduled_at"] == body["scheduled_at"]
    assert api.delete(f"/broadcasts/{bid}").status_code == 409
    r = api.post(f"/broadcasts/{bid}/schedule", json={"at": iso(60)})
    assert (r.status_code, r.json()["success"]) == (409, False)
    r = api.post(f"/broadcasts/{bid}/unschedule")
    assert (r.status_code, r.json()["status"]) == (200, "draft")
    r = api.post(f"/broadcasts/{bid}/unschedule")
    assert (r.status_code, r.json()["status"]) == (409, "draft")
    assert api.patch(f"/broadcasts/{bid}", json={"subject": "changed"}).status_code == 200
    log = conn.execute("SELECT audit_log FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert log is not None
    actions = [(e["action"], e["details"].get("sub")) for e in log["audit_log"]]
    assert ("schedule", "tester") in actions and ("unschedule", "tester") in actions


@pytest.mark.parametrize("body", [
    {"at": "2026-12-24T09:00:00"}, {"at": "2020-01-01T00:00:00Z"}, {"at": "soon"},
    {"at": 5}, {}, {"at": "+60", "extra": 1}, {"at": "+3600", "not_after": "+60"}])
def test_bad_schedule_bodies_are_422_and_change_nothing(api: h.Api, conn: Conn,
                                                        body: dict[str, Any]) -> None:
    bid = draft(conn)
    body = {k: iso(float(v)) if isinstance(v, str) and v.startswith("+") else v
            for k, v in body.items()}
    r = api.post(f"/broadcasts/{bid}/schedule", json=body)
    assert r.status_code == 422, r.text
    assert support.progress(conn, bid)["status"] == "draft"


def test_a_naive_time_is_refused_with_a_clear_message(api: h.Api, conn: Conn) -> None:
    r = api.post(f"/broadcasts/{draft(conn)}/schedule", json={"at": "2026-12-24T09:00:00"})
    assert "has no offset" in r.json()["message"]


def test_send_starts_a_scheduled_broadcast_at_once(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 3, account=A)
    bid = draft(conn)
    api.post(f"/broadcasts/{bid}/schedule", json={"at": iso(3600)})
    r = api.post(f"/broadcasts/{bid}/send")
    assert (r.status_code, r.json()["status"], r.json()["queued"]) == (200, "sending", 3)
    assert starter.start_due(conn) == []
    log = conn.execute("SELECT audit_log -> -1 AS e FROM broadcasts WHERE id = %s",
                       (bid,)).fetchone()
    assert log is not None and (log["e"]["action"], log["e"]["from"]) == ("send", "scheduled")


def test_cancel_a_scheduled_broadcast(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 3, account=A)
    bid = draft(conn)
    api.post(f"/broadcasts/{bid}/schedule", json={"at": iso(-1)})
    r = api.post(f"/broadcasts/{bid}/cancel")
    assert (r.status_code, r.json()["status"]) == (200, "cancelled")
    assert starter.start_due(conn) == []
    assert support.progress(conn, bid)["total"] == 0


def test_other_accounts_and_bad_ids_are_404(api: h.Api, conn: Conn) -> None:
    theirs = support.new_broadcast(conn, account="other", send=False)
    for path, body in (("schedule", {"at": iso(60)}), ("unschedule", None), ("retry", None),
                       ("copy", None)):
        for bid in (theirs, "not-an-id"):
            r = api.post(f"/broadcasts/{bid}/{path}", json=body)
            assert r.status_code == 404, (path, r.text)
    assert support.progress(conn, theirs)["status"] == "draft"


def test_retry_route(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 3, account=A)
    bid = support.new_broadcast(conn, account=A)
    r = api.post(f"/broadcasts/{bid}/retry")
    assert (r.status_code, r.json()) == (409, {
        "success": False, "status": "sending", "requeued": 0,
        "message": "Broadcast is sending; only a finished (sent or failed) broadcast can be "
                   "retried"})
    token, rows = dispatch.claim(conn, bid, 3)
    ids = sorted(x["contact_id"] for x in rows)
    dispatch.handoff(conn, bid, rows[0]["epoch"], token, ids)
    dispatch.record(conn, bid, token, ids[:1], "failed")
    dispatch.record(conn, bid, token, ids[1:], "unknown")
    conn.execute(QUERIES["finalize"], {"id": bid})
    for body in ({"include_unknown": "yes"}, {"other": True}, [1]):
        assert api.post(f"/broadcasts/{bid}/retry", json=body).status_code == 422
    conn.execute("UPDATE broadcast_recipients SET handed_at = handed_at - interval '1 hour' "
                 "WHERE broadcast_id = %s", (bid,))  # their calls can no longer answer
    r = api.post(f"/broadcasts/{bid}/retry", json={"include_unknown": True})
    assert (r.status_code, r.json()) == (200, {"success": True, "status": "sending",
                                               "requeued": 3, "in_doubt": 0,
                                               "message": "Retrying 3 recipients"})
    support.assert_counters_true(conn, bid)
    entry = conn.execute("SELECT audit_log -> -1 -> 'details' AS d FROM broadcasts "
                         "WHERE id = %s", (bid,)).fetchone()
    assert entry is not None
    assert entry["d"] == {"via": "api", "sub": "tester", "requeued": 3, "failed": 1,
                          "unknown": 2, "include_unknown": True, "in_doubt": 0,
                          "in_doubt_seconds": schedule.in_doubt_seconds()}


def test_copy_route(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 3, account=A)
    bid = support.new_broadcast(conn, account=A)
    r = api.post(f"/broadcasts/{bid}/copy")
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["id"] != str(bid) and new["status"] == "draft" and new["total"] == 0
    assert r.headers["Location"] == f"/broadcasts/{new['id']}"
    assert (new["subject"], new["text"]) == ("Hello", "Hello there")
