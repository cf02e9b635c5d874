"""Unknown recipients reconciled from SES's own events (issue 25): every event that names an
`unknown` row resolves it once, through the real webhook with real signed SNS messages
(tests.snsmessages); with PGCAST_RECONCILE_AFTER, a row with no event is requeued once."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgcast.api import sns, webhooks
from pgcast.sql.queries import QUERIES
from pgcast.worker import reconcile
from tests import snsmessages as m
from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT
AFTER = 15 * 60.0  # seconds: PGCAST_RECONCILE_AFTER=15m


class Hook:
    """POST /webhooks/ses with the test certificate behind the verifier's fetch seam."""

    def __init__(self, api: h.Api) -> None:
        self.api = api

    def event(self, body: dict[str, Any]) -> dict[str, Any]:
        """One SES event, signed and posted the way SNS does; the webhook's JSON answer."""
        r = self.api.post("/webhooks/ses", content=json.dumps(m.notification(body)),
                          headers={"Content-Type": "text/plain; charset=UTF-8",
                                   "x-amz-sns-message-type": "Notification"})
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture
def hook(db_url: str) -> Iterator[Hook]:
    with h.client(db_url) as api:
        api.app.state.feedback = webhooks.Feedback(
            sns.Verifier(frozenset({m.TOPIC}), webhooks.DEFAULT_MAX_AGE, fetch=m.Fetcher()))
        yield Hook(api)


def with_unknown(conn: Conn, n: int = 4, status: str = "sent",
                 handed: str = "1 hour") -> tuple[uuid.UUID, list[dict[str, Any]]]:
    """A finished broadcast whose rows a lost worker left `unknown`, handed off `handed` ago."""
    support.seed_contacts(conn, n, account=A)
    bid = support.new_broadcast(conn, account=A)
    conn.execute("UPDATE broadcast_recipients SET status = 'unknown', worker = 'w', attempts = 1,"
                 " handed_at = now() - %s::interval, last_error = 'worker lost during handoff'"
                 " WHERE broadcast_id = %s", (handed, bid))
    conn.execute("UPDATE broadcasts SET unknown = total, status = %s, finished_at = now() "
                 "WHERE id = %s", (status, bid))
    rows = conn.execute("SELECT contact_id, email FROM broadcast_recipients "
                        "WHERE broadcast_id = %s ORDER BY contact_id", (bid,)).fetchall()
    return bid, [dict(r) for r in rows]


def row(conn: Conn, bid: uuid.UUID, cid: int) -> dict[str, Any]:
    got = conn.execute("SELECT * FROM broadcast_recipients WHERE broadcast_id = %s "
                       "AND contact_id = %s", (bid, cid)).fetchone()
    assert got is not None
    return dict(got)


def counts(conn: Conn, bid: uuid.UUID) -> dict[str, Any]:
    got = conn.execute(QUERIES["reconcile_counts"], {"id": bid}).fetchone()
    assert got is not None
    return dict(got)


def audit(conn: Conn, bid: uuid.UUID, action: str) -> list[dict[str, Any]]:
    got = conn.execute("SELECT audit_log FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert got is not None
    return [{**e, **e["details"]} for e in got["audit_log"] if e["action"] == action]


def epoch_of(conn: Conn, bid: uuid.UUID) -> int:
    got = conn.execute("SELECT epoch FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert got is not None
    return int(got["epoch"])


def ses_event(kind: str, r: dict[str, Any], bid: uuid.UUID) -> dict[str, Any]:
    body = m.ses_event(kind, r["email"], broadcast=bid, contact=r["contact_id"])
    if kind == "Reject":
        body["reject"] = {"reason": "Bad content"}
    elif kind == "Rendering Failure":
        body["failure"] = {"errorMessage": "Attribute 'name' is not present",
                           "templateName": "t"}
    return body


@pytest.mark.parametrize(("kind", "outcome"), [
    ("Send", "sent"), ("Delivery", "sent"), ("Bounce", "sent"), ("Complaint", "sent"),
    ("Reject", "failed"), ("Rendering Failure", "failed")])
def test_each_ses_event_resolves_an_unknown_row_once_audited_and_counted(
        hook: Hook, conn: Conn, kind: str, outcome: str) -> None:
    bid, rows = with_unknown(conn)
    r0 = rows[0]
    body = ses_event(kind, r0, bid)
    answer = hook.event(body)
    assert answer["reconciled"] == outcome, answer
    got = row(conn, bid, r0["contact_id"])
    assert got["status"] == outcome and got["reconciled"] == kind.lower().replace(" ", "")
    if outcome == "sent":
        assert got["provider_message_id"] == body["mail"]["messageId"]
        assert got["sent_at"] is not None and got["last_error"] is None
    else:
        assert got["provider_message_id"] is None and got["last_error"].startswith("SES ")
    p = support.assert_counters_true(conn, bid)
    assert p["unknown"] == len(rows) - 1 and p[outcome] == 1
    assert counts(conn, bid)["resolved"] == 1
    [entry] = audit(conn, bid, "reconcile")
    assert (entry["contact"], entry["outcome"]) == (r0["contact_id"], outcome)
    # a second event for the same message (another type, or SNS sending it again) is no
    # second resolution: the row is no longer unknown
    again = hook.event(ses_event("Delivery", r0, bid))
    assert "reconciled" not in again
    assert support.assert_counters_true(conn, bid)[outcome] == 1
    assert counts(conn, bid)["resolved"] == 1 and len(audit(conn, bid, "reconcile")) == 1


def test_a_sent_row_of_a_broadcast_that_had_failed_makes_it_sent(hook: Hook, conn: Conn) -> None:
    bid, rows = with_unknown(conn, status="failed")
    hook.event(ses_event("Send", rows[0], bid))
    assert support.assert_counters_true(conn, bid)["status"] == "sent"


def test_an_event_for_a_row_that_is_not_unknown_changes_nothing(hook: Hook,
                                                                conn: Conn) -> None:
    support.seed_contacts(conn, 2, account=A)
    bid = support.new_broadcast(conn, account=A)
    conn.execute("UPDATE broadcast_recipients SET status = 'sent', worker = 'w', "
                 "provider_message_id = 'ours' WHERE broadcast_id = %s", (bid,))
    conn.execute("UPDATE broadcasts SET sent = total WHERE id = %s", (bid,))
    r0 = dict(conn.execute("SELECT contact_id, email FROM broadcast_recipients "
                           "WHERE broadcast_id = %s LIMIT 1", (bid,)).fetchone() or {})
    assert "reconciled" not in hook.event(ses_event("Send", r0, bid))
    assert row(conn, bid, r0["contact_id"])["provider_message_id"] == "ours"
    assert counts(conn, bid)["resolved"] == 0


def test_rows_with_no_event_after_the_delay_are_requeued_once_never_twice(
        conn: Conn) -> None:
    bid, rows = with_unknown(conn, n=3)
    recent = rows[2]["contact_id"]  # handed off a minute ago: not yet
    conn.execute("UPDATE broadcast_recipients SET handed_at = now() - interval '1 minute' "
                 "WHERE broadcast_id = %s AND contact_id = %s", (bid, recent))
    epoch = epoch_of(conn, bid)
    dry = reconcile.requeue(conn, AFTER, bid, dry_run=True)
    assert [r["requeued"] for r in dry] == [2]
    assert counts(conn, bid)["open"] == 3  # a dry run changes nothing
    done = reconcile.requeue(conn, AFTER, bid)
    assert [(r["requeued"], r["status"]) for r in done] == [(2, "sending")]
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["unknown"], p["pending"]) == ("sending", 1, 2)
    assert counts(conn, bid)["requeued"] == 2
    [entry] = audit(conn, bid, "reconcile_requeue")
    assert (entry["from"], entry["to"], entry["requeued"]) == ("sent", "sending", 2)
    assert epoch_of(conn, bid) == epoch + 1  # work claimed before is fenced
    # the requeued rows are sent again and their outcome is lost again: never a second time
    conn.execute("UPDATE broadcast_recipients SET status = 'unknown', "
                 "handed_at = now() - interval '1 hour' WHERE broadcast_id = %s "
                 "AND status = 'pending'", (bid,))
    conn.execute("UPDATE broadcasts SET unknown = unknown + 2 WHERE id = %s", (bid,))
    assert reconcile.requeue(conn, AFTER, bid) == []
    assert counts(conn, bid) == {**counts(conn, bid), "open": 3, "requeued": 2}


def test_a_late_event_after_a_requeue_changes_nothing_twice(hook: Hook, conn: Conn) -> None:
    bid, rows = with_unknown(conn, n=1)
    r0 = rows[0]
    assert [r["requeued"] for r in reconcile.requeue(conn, AFTER, bid)] == [1]
    # the second send is recorded (as a worker does), then the first send's event arrives
    conn.execute("UPDATE broadcast_recipients SET status = 'sent', provider_message_id = "
                 "'second', sent_at = now() WHERE broadcast_id = %s", (bid,))
    conn.execute("UPDATE broadcasts SET sent = sent + 1 WHERE id = %s", (bid,))
    before = support.assert_counters_true(conn, bid)
    assert "reconciled" not in hook.event(ses_event("Send", r0, bid))
    assert row(conn, bid, r0["contact_id"])["provider_message_id"] == "second"
    after = support.assert_counters_true(conn, bid)
    assert (after["sent"], after["unknown"]) == (before["sent"], before["unknown"]) == (1, 0)
    assert counts(conn, bid)["resolved"] == 0 and audit(conn, bid, "reconcile") == []


def test_pgcast_reconcile_dry_run_then_apply(db_url: str, conn: Conn) -> None:
    bid, _ = with_unknown(conn, n=2)
    dry = support.pgcast(db_url, "reconcile", str(bid), "--account", A, "--dry-run",
                         "--after", "15m")
    out = json.loads(dry.stdout)
    assert (out["unknown_open"], out["would_requeue"]) == (2, 2)
    assert counts(conn, bid)["open"] == 2
    done = json.loads(support.pgcast(db_url, "reconcile", str(bid), "--account", A,
                                     "--after", "15m").stdout)
    assert (done["unknown_open"], done["unknown_requeued"], done["requeued_now"]) == (0, 2, 2)
    again = json.loads(support.pgcast(db_url, "reconcile", str(bid), "--account", A,
                                      "--after", "15m").stdout)
    assert again["requeued_now"] == 0


def test_the_delay_is_a_duration() -> None:
    assert reconcile.parse_after("15m") == 900.0
    assert reconcile.parse_after("900") == reconcile.parse_after("900s") == 900.0
    assert reconcile.parse_after("1.5h") == 5400.0
    for bad in ("", "0", "-5m", "soon", "15 minutes", "nan"):
        with pytest.raises(Exception, match="PGCAST_RECONCILE_AFTER"):
            reconcile.parse_after(bad)


def test_a_broadcast_marked_for_the_archive_is_never_requeued(conn: Conn) -> None:
    """As a retry (0013): once retention has marked a finished broadcast under its row lock,
    its rows may be detached at any moment; a requeue would leave them pending forever."""
    bid, _ = with_unknown(conn, n=2)
    assert conn.execute(QUERIES["retention_archive_begin"], {"id": bid}).fetchone() == {
        "begun": True}
    assert [r["requeued"] for r in reconcile.requeue(conn, AFTER, bid)] in ([], [0])
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["unknown"], p["pending"]) == ("sent", 2, 0)
