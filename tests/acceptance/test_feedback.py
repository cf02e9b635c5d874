"""SES feedback end to end: real workers send through moto's SES while signed SNS
notifications reach the webhook (the app in-process, the test certificate behind its seam)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgcast.sql import broadcasts
from tests import snsmessages as m
from tests import support
from tests.integration import test_api_helpers as h
from tests.integration import test_feedback_webhook as fw

Conn = psycopg.Connection[dict[str, Any]]
A = "default"


def ses_env(ses: support.MotoServer, **extra: str) -> dict[str, str]:
    return {**ses.env(), "PGCAST_PROVIDER": "ses", "PGCAST_RATE": "0", **extra}


@pytest.fixture
def hook(db_url: str) -> Iterator[fw.Hook]:
    fetcher = m.Fetcher()
    with h.client(db_url) as api:
        api.app.state.feedback = fw.feedback(fetcher, guard_min=100)
        yield fw.Hook(api, fetcher)


def bounce(hook: fw.Hook, bid: uuid.UUID, row: dict[str, Any]) -> dict[str, Any]:
    ev = m.ses_event("Bounce", row["email"], broadcast=bid, contact=row["contact_id"])
    r = hook.post(m.notification(ev, version="2"))
    assert r.status_code == 200, r.text
    return dict(r.json())


def sent_rows(conn: Conn, bid: uuid.UUID) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(
        "SELECT contact_id, email FROM broadcast_recipients WHERE broadcast_id = %s "
        "AND worker IS NOT NULL AND status = 'sent' ORDER BY contact_id", (bid,))]


def test_the_guard_pauses_a_sending_broadcast_when_bounces_cross_the_threshold(
        conn: Conn, db_url: str, ses: support.MotoServer, procs: support.Processes,
        hook: fw.Hook) -> None:
    ses.verify("news@example.com")
    support.seed_contacts(conn, 1500)
    draft = broadcasts.create(conn, A, subject="Hello", from_address="news@example.com",
                              text="Hello there", rate_limit=150)
    bid = uuid.UUID(str(draft["id"]))
    assert broadcasts.send(conn, A, bid)["success"]
    procs.start(db_url, "worker", "--group-size", "10", **ses_env(ses))
    # a stream of hard bounces: every 10th recipient sent (10 %, the limit is 5 %)
    bounced: set[int] = set()
    answers: list[dict[str, Any]] = []

    def stream() -> bool:
        for i, row in enumerate(sent_rows(conn, bid)):
            if i % 10 == 0 and row["contact_id"] not in bounced:
                bounced.add(row["contact_id"])
                answers.append(bounce(hook, bid, row))
                if "paused" in answers[-1]:
                    return True
        return support.progress(conn, bid)["status"] != "sending"

    support.wait_for(stream, timeout=120, every=0.1, what="the guard to pause the broadcast")
    p = support.progress(conn, bid)
    assert (p["status"], p["paused_reason"]) == ("paused", "bounce_rate"), p
    assert p["pending"] > 0  # it paused while it was sending
    assert p["sent"] >= 100 and p["bounced"] > 0.05 * p["sent"] - 1
    assert answers[-1] == {"outcome": "applied", "paused": "bounce_rate"}
    assert sum(1 for a in answers if "paused" in a) == 1
    audit = conn.execute("SELECT audit_log FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert audit is not None
    pause = [e for e in audit["audit_log"] if e["action"] == "pause"]
    assert len(pause) == 1
    assert pause[0]["details"]["reason"] == "bounce_rate"
    assert pause[0]["details"]["by"] == "guard"
    assert pause[0]["details"]["bounced"] * 20 > pause[0]["details"]["sent"]
    fw.assert_feedback_counters_true(conn, bid)
    # resume re-arms the guard from the counts at the resume: old bounces no longer count
    support.wait_for(lambda: support.status_counts(conn, bid).get("sending", 0) == 0,
                     what="the groups in flight to be recorded")
    assert broadcasts.resume(conn, A, bid)["success"]
    at_resume = conn.execute("SELECT sent, bounced, guard_sent, guard_bounced FROM broadcasts "
                             "WHERE id = %s", (bid,)).fetchone()
    assert at_resume is not None
    assert (at_resume["guard_sent"], at_resume["guard_bounced"]) == (
        at_resume["sent"], at_resume["bounced"])
    late = [r for r in sent_rows(conn, bid) if r["contact_id"] not in bounced][:3]
    for row in late:  # late bounces of mail sent before the pause: fewer than 100 sent since
        assert bounce(hook, bid, row) == {"outcome": "applied"}
    final = support.wait_for(
        lambda: (q := support.progress(conn, bid))["status"] in ("sent", "paused") and q,
        timeout=120, every=0.2, what="the broadcast to finish")
    assert final["status"] == "sent", final
    support.assert_counters_true(conn, bid)
    fw.assert_feedback_counters_true(conn, bid)


def _mailed(ses: support.MotoServer) -> list[str]:
    return [to.split("<")[-1].rstrip(">") for msg in ses.messages()
            for to in msg["destinations"]["ToAddresses"]]


def _drain(conn: Conn, db_url: str, ses: support.MotoServer, bid: uuid.UUID) -> dict[str, Any]:
    support.pgcast(db_url, "worker", "--once", env=support.pgcast_env(db_url, **ses_env(ses)))
    return support.progress(conn, bid)


def _row(conn: Conn, bid: uuid.UUID, email: str) -> dict[str, Any]:
    row = conn.execute("SELECT contact_id, email FROM broadcast_recipients "
                       "WHERE broadcast_id = %s AND email = %s", (bid, email)).fetchone()
    assert row is not None
    return dict(row)


@pytest.mark.parametrize("kind", ["Bounce", "Complaint"])
def test_a_hard_bounce_or_complaint_suppresses_the_contact_and_the_next_broadcast_skips_it(
        conn: Conn, db_url: str, ses: support.MotoServer, hook: fw.Hook, kind: str) -> None:
    ses.verify("news@example.com")
    support.seed_contacts(conn, 20)
    first = support.new_broadcast(conn)
    assert _drain(conn, db_url, ses, first)["sent"] == 20
    gone = _row(conn, first, "user3@example.com")
    ev = m.ses_event(kind, gone["email"], broadcast=first, contact=gone["contact_id"])
    assert hook.post(m.notification(ev)).json() == {"outcome": "applied"}
    # a broadcast snapshotted before the next event: that contact is skipped at the handoff
    second = support.new_broadcast(conn)
    late = _row(conn, second, "user5@example.com")
    ev = m.ses_event(kind, late["email"], broadcast=first,
                     contact=_row(conn, first, "user5@example.com")["contact_id"])
    assert hook.post(m.notification(ev)).json() == {"outcome": "applied"}
    assert support.progress(conn, second)["total"] == 19  # user3 left out of the snapshot
    p = _drain(conn, db_url, ses, second)
    assert (p["status"], p["sent"], p["skipped"]) == ("sent", 18, 1), p
    support.assert_counters_true(conn, second)
    mailed = _mailed(ses)
    assert len(mailed) == 38
    assert mailed.count("user3@example.com") == 1 and mailed.count("user5@example.com") == 1
