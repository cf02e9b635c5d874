"""Suppressed contacts: the API routes and the CLI commands, audited and tenant-scoped; the
guard's thresholds; EmailTags on the SES request."""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from typing import Any

import boto3
import psycopg
import pytest

from pgcast.api import sns, webhooks
from pgcast.sql import broadcasts
from pgcast.worker import render, ses
from tests import snsmessages as m
from tests import support
from tests.integration import test_api_helpers as h
from tests.integration import test_feedback_webhook as fw

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT


def suppress(conn: Conn, account: str, email: str, reason: str) -> None:
    conn.execute("UPDATE contacts SET suppressed_at = now(), suppressed_reason = %s, "
                 "suppressed_detail = 'why', soft_bounces = 2 "
                 "WHERE account = %s AND email = %s", (reason, account, email))


def seeded(conn: Conn) -> None:
    support.seed_contacts(conn, 6, account=A)
    support.seed_contacts(conn, 3, account="other")
    suppress(conn, A, "user1@example.com", "bounce")
    suppress(conn, A, "user2@example.com", "complaint")
    suppress(conn, A, "user4@example.com", "soft_bounce")
    suppress(conn, "other", "user0@example.com", "bounce")


def test_get_suppressed_lists_the_accounts_own_by_reason_and_pages(api: h.Api,
                                                                   conn: Conn) -> None:
    seeded(conn)
    r = api.get("/contacts/suppressed")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(c["email"], c["reason"]) for c in body["contacts"]] == [
        ("user1@example.com", "bounce"), ("user2@example.com", "complaint"),
        ("user4@example.com", "soft_bounce")]
    assert body["next_cursor"] is None
    assert body["contacts"][0]["detail"] == "why" and body["contacts"][0]["soft_bounces"] == 2
    r = api.get("/contacts/suppressed", params={"reason": "complaint"})
    assert [c["email"] for c in r.json()["contacts"]] == ["user2@example.com"]
    first = api.get("/contacts/suppressed", params={"limit": 2}).json()
    assert len(first["contacts"]) == 2 and first["next_cursor"]
    assert not first["next_cursor"].isdigit()  # sealed: no contact id shows through
    rest = api.get("/contacts/suppressed", params={"cursor": first["next_cursor"]}).json()
    assert [c["email"] for c in rest["contacts"]] == ["user4@example.com"]
    assert rest["next_cursor"] is None
    exact = api.get("/contacts/suppressed", params={"limit": 3}).json()
    assert len(exact["contacts"]) == 3 and exact["next_cursor"] is None  # no empty last page
    for bad in ("3", first["next_cursor"] + "x"):
        assert api.get("/contacts/suppressed", params={"cursor": bad}).status_code == 422
    # a cursor is refused in another account and for another reason
    assert api.get("/contacts/suppressed", params={"cursor": first["next_cursor"]},
                   headers=h.auth("other")).status_code == 422
    assert api.get("/contacts/suppressed", params={"cursor": first["next_cursor"],
                                                   "reason": "bounce"}).status_code == 422
    assert api.get("/contacts/suppressed", params={"reason": "spam"}).status_code == 422
    other = api.get("/contacts/suppressed", headers=h.auth("other")).json()
    assert [c["email"] for c in other["contacts"]] == ["user0@example.com"]


def test_post_unsuppress_lifts_audits_and_is_scoped(api: h.Api, conn: Conn) -> None:
    seeded(conn)
    r = api.post("/contacts/unsuppress", json={"email": "USER2@example.com"})
    assert (r.status_code, r.json()) == (200, {
        "success": True, "email": "user2@example.com", "was": "complaint",
        "message": "suppression (complaint) lifted"})
    row = conn.execute("SELECT suppressed_at, suppressed_reason, soft_bounces FROM contacts "
                       "WHERE account = %s AND email = 'user2@example.com'", (A,)).fetchone()
    assert row == {"suppressed_at": None, "suppressed_reason": None, "soft_bounces": 0}
    ev = conn.execute("SELECT action, source, actor, details FROM contact_events").fetchall()
    assert [(e["action"], e["source"], e["actor"], e["details"]["reason"]) for e in ev] == [
        ("unsuppress", "api", {"via": "api", "sub": "tester"}, "complaint")]
    again = api.post("/contacts/unsuppress", json={"email": "user2@example.com"})
    assert (again.status_code, again.json()["success"]) == (409, False)
    assert api.post("/contacts/unsuppress", json={"email": "no@example.com"}).status_code == 404
    # another account's suppressed contact is unknown here
    assert api.post("/contacts/unsuppress", json={"email": "user0@example.com"},
                    headers=h.auth("other")).status_code == 200
    assert api.post("/contacts/unsuppress",
                    json={"email": "user1@example.com"}, headers=h.auth("nobody")
                    ).status_code == 404
    assert api.post("/contacts/unsuppress", json={"mail": "x"}).status_code == 422


def test_cli_suppressed_and_unsuppress(conn: Conn, db_url: str) -> None:
    seeded(conn)
    done = support.pgcast(db_url, "contacts", "suppressed", "--account", A)
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    assert [(x["email"], x["reason"]) for x in lines] == [
        ("user1@example.com", "bounce"), ("user2@example.com", "complaint"),
        ("user4@example.com", "soft_bounce")]
    done = support.pgcast(db_url, "contacts", "suppressed", "--account", A, "--reason",
                          "soft_bounce")
    assert [json.loads(x)["email"] for x in done.stdout.splitlines()] == ["user4@example.com"]
    done = support.pgcast(db_url, "contacts", "unsuppress", "user1@example.com", "--account", A)
    assert json.loads(done.stdout)["success"] is True
    ev = conn.execute("SELECT action, source, actor FROM contact_events").fetchone()
    assert ev is not None and (ev["action"], ev["source"], ev["actor"]["via"]) == (
        "unsuppress", "cli", "cli")
    again = support.pgcast(db_url, "contacts", "unsuppress", "user1@example.com", "--account",
                           A, check=False)
    assert again.returncode == 1 and json.loads(again.stdout)["success"] is False
    missing = support.pgcast(db_url, "contacts", "unsuppress", "nobody@example.com", check=False)
    assert missing.returncode == 2 and "no contact" in missing.stderr


def test_api_refuses_to_start_with_a_limit_out_of_range(db_url: str) -> None:
    env = support.pgcast_env(db_url, PGCAST_JWT_SECRET=h.SECRET, PGCAST_SNS_TOPIC_ARNS=m.TOPIC,
                             PGCAST_MAX_BOUNCE_RATE="5")
    done = support.pgcast(db_url, "api", "--port", str(support.free_port()), env=env,
                          check=False, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pgcast: error: PGCAST_MAX_BOUNCE_RATE must be between 0 and 1: '5'"]


def test_progress_shows_feedback_counters_in_api_and_cli(api: h.Api, conn: Conn,
                                                         db_url: str) -> None:
    support.seed_contacts(conn, 3, account=A)
    bid = support.new_broadcast(conn, account=A)
    conn.execute("UPDATE broadcasts SET delivered = 2, bounced = 1, complained = 0 "
                 "WHERE id = %s", (bid,))
    p = api.get(f"/broadcasts/{bid}/progress").json()
    assert (p["delivered"], p["bounced"], p["complained"]) == (2, 1, 0)
    out = json.loads(support.pgcast(db_url, "broadcast", "status", str(bid), "--account",
                                    A).stdout)
    assert (out["delivered"], out["bounced"], out["complained"]) == (2, 1, 0)


@pytest.mark.parametrize(("kind", "reason", "limit"), [("Bounce", "bounce_rate", 10),
                                                       ("Complaint", "complaint_rate", 1)])
def test_the_guard_pauses_past_the_rate_and_resume_rearms_it(
        db_url: str, conn: Conn, kind: str, reason: str, limit: int) -> None:
    fetcher = m.Fetcher()
    with h.client(db_url) as api:
        api.app.state.feedback = webhooks.Feedback(
            sns.Verifier(frozenset({m.TOPIC}), 3600, fetch=fetcher),
            guard_min=200, max_bounce_rate=0.05, max_complaint_rate=0.005)
        hook = fw.Hook(api, fetcher)
        bid, rows = fw.sending(conn, n=200)

        def post(row: dict[str, Any]) -> dict[str, Any]:
            ev = m.ses_event(kind, row["email"], broadcast=bid, contact=row["contact_id"])
            return dict(hook.post(m.notification(ev)).json())

        # 200 sent: 10 bounces (5 %) or 1 complaint (0.5 %) are at the limit, not past it
        for row in rows[:limit]:
            assert post(row) == {"outcome": "applied"}
        assert support.progress(conn, bid)["status"] == "sending"
        assert post(rows[limit]) == {"outcome": "applied", "paused": reason}
        p = support.progress(conn, bid)
        assert (p["status"], p["paused_reason"]) == ("paused", reason)
        assert broadcasts.resume(conn, A, bid)["success"]
        # re-armed at the resume: judged on what is sent after it, PGCAST_GUARD_MIN first
        conn.execute("UPDATE broadcasts SET sent = sent + 199 WHERE id = %s", (bid,))
        after = rows[limit + 1:]
        for row in after[:limit + 1]:  # past the rate, but 199 sent since: too few
            assert post(row) == {"outcome": "applied"}
        conn.execute("UPDATE broadcasts SET sent = sent + 1 WHERE id = %s", (bid,))
        assert post(after[limit + 1]) == {"outcome": "applied", "paused": reason}


class _Recorder(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        body = json.dumps({"MessageId": "m-1"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_every_ses_send_carries_the_broadcast_and_contact_tags() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = boto3.client("sesv2", endpoint_url=f"http://127.0.0.1:{server.server_port}",
                              region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing")
        bid = str(uuid.uuid4())
        message = render.Message(42, "Ann <a@example.com>", "news@example.com", "Hi", "Hello",
                                 None, {"X-Pgcast-Broadcast": bid})
        assert ses.SesProvider(client).send(message) == "m-1"
    finally:
        server.shutdown()
        server.server_close()
    sent = json.loads(_Recorder.bodies[-1])
    assert sent["EmailTags"] == [{"Name": "pgcast_broadcast", "Value": bid},
                                 {"Name": "pgcast_contact", "Value": "42"}]
