"""Retry: a finished broadcast's failed (and, when asked, unknown) rows sent again."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg

from pgcast.api import progress as api_progress
from pgcast.sql import contacts, schedule
from pgcast.sql.queries import QUERIES
from tests import support
from tests.integration import test_dispatch as dispatch

Conn = psycopg.Connection[dict[str, Any]]


def finished_with(conn: Conn, outcomes: list[str]) -> tuple[uuid.UUID, list[int], uuid.UUID]:
    """A broadcast of len(outcomes) recipients, each recorded with its outcome, finalized."""
    support.seed_contacts(conn, len(outcomes))
    bid = support.new_broadcast(conn)
    token, rows = dispatch.claim(conn, bid, len(outcomes))
    ids = sorted(r["contact_id"] for r in rows)
    dispatch.handoff(conn, bid, rows[0]["epoch"], token, ids)
    for outcome in sorted(set(outcomes)):
        dispatch.record(conn, bid, token, [i for i, o in zip(ids, outcomes, strict=True)
                                           if o == outcome], outcome)
    conn.execute(QUERIES["finalize"], {"id": bid})
    return bid, ids, token


def epoch_of(conn: Conn, bid: uuid.UUID) -> int:
    row = conn.execute("SELECT epoch FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert row is not None
    return int(row["epoch"])


def test_retry_requeues_failed_rows_only_under_a_new_epoch(conn: Conn) -> None:
    bid, ids, old_token = finished_with(conn, ["sent", "failed", "failed", "unknown"])
    assert support.progress(conn, bid)["status"] == "sent"
    before = epoch_of(conn, bid)
    result = schedule.retry(conn, "default", bid, details={"via": "test"})
    assert result == {"success": True, "status": "sending", "requeued": 2,
                      "message": "Retrying 2 recipients"}
    assert epoch_of(conn, bid) == before + 1
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["sent"], p["failed"], p["unknown"], p["pending"]) == (
        "sending", 1, 0, 1, 2)
    rows = conn.execute("SELECT contact_id, status, attempts, claim_token, last_error, worker "
                        "FROM broadcast_recipients WHERE broadcast_id = %s ORDER BY contact_id",
                        (bid,)).fetchall()
    requeued = [r for r in rows if r["status"] == "pending"]
    assert [r["contact_id"] for r in requeued] == ids[1:3]
    for r in requeued:  # found through the requeued index: worker stays set
        assert (r["attempts"], r["claim_token"], r["last_error"]) == (0, None, None)
        assert r["worker"] is not None
    entry = conn.execute("SELECT audit_log -> -1 AS e FROM broadcasts WHERE id = %s",
                         (bid,)).fetchone()
    assert entry is not None
    e = entry["e"]
    assert (e["action"], e["from"], e["to"]) == ("retry", "sent", "sending")
    assert e["details"] == {"via": "test", "requeued": 2, "failed": 2, "unknown": 0,
                            "include_unknown": False}
    # a late record of the first pass cannot touch them (its claim is gone)
    late = dispatch.record(conn, bid, old_token, ids[1:3], "sent")
    assert late["recorded"] == 0
    # a claim takes them first, and they go through the fence again
    token, claimed = dispatch.claim(conn, bid, 10)
    assert sorted(r["contact_id"] for r in claimed) == ids[1:3]
    assert {r["epoch"] for r in claimed} == {before + 1}
    sent = dispatch.handoff(conn, bid, before + 1, token, ids[1:3])
    dispatch.record(conn, bid, token, [r["contact_id"] for r in sent], "sent")
    conn.execute(QUERIES["finalize"], {"id": bid})
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["sent"], p["unknown"]) == ("sent", 3, 1)


def test_unknown_rows_need_include_unknown(conn: Conn) -> None:
    bid, ids, _ = finished_with(conn, ["sent", "unknown", "unknown"])
    nothing = schedule.retry(conn, "default", bid)
    assert nothing == {"success": False, "status": "sent", "requeued": 0,
                       "message": "Broadcast is sent with no failed recipients to retry"}
    assert support.progress(conn, bid)["status"] == "sent"
    # handed off just now: their calls may still be answered
    doubt = schedule.retry(conn, "default", bid, include_unknown=True)
    assert (doubt["success"], doubt["requeued"], doubt["in_doubt"]) == (False, 0, 2)
    conn.execute("UPDATE broadcast_recipients SET handed_at = handed_at - interval '1 hour' "
                 "WHERE broadcast_id = %s", (bid,))
    result = schedule.retry(conn, "default", bid, include_unknown=True)
    assert (result["success"], result["requeued"], result["in_doubt"]) == (True, 2, 0)
    p = support.assert_counters_true(conn, bid)
    assert (p["unknown"], p["pending"]) == (0, 2)
    entry = conn.execute("SELECT audit_log -> -1 -> 'details' AS d FROM broadcasts "
                         "WHERE id = %s", (bid,)).fetchone()
    assert entry is not None and entry["d"]["include_unknown"] is True
    assert entry["d"]["unknown"] == 2


def test_a_contact_unsubscribed_since_is_skipped_by_the_fence(conn: Conn) -> None:
    bid, ids, _ = finished_with(conn, ["failed", "failed", "failed"])
    assert support.progress(conn, bid)["status"] == "failed"
    schedule.retry(conn, "default", bid)
    contacts.unsubscribe(conn, "default", "user1@example.com")
    token, claimed = dispatch.claim(conn, bid, 10)
    handed = dispatch.handoff(conn, bid, claimed[0]["epoch"], token, ids)
    assert sorted(r["email"] for r in handed) == ["user0@example.com", "user2@example.com"]
    dispatch.record(conn, bid, token, [r["contact_id"] for r in handed], "sent")
    conn.execute(QUERIES["finalize"], {"id": bid})
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["sent"], p["skipped"], p["failed"]) == ("sent", 2, 1, 0)


def test_retry_is_refused_unless_finished(conn: Conn) -> None:
    support.seed_contacts(conn, 3)
    sending = support.new_broadcast(conn)
    draft = support.new_broadcast(conn, send=False)
    for bid, status in ((sending, "sending"), (draft, "draft")):
        result = schedule.retry(conn, "default", bid, include_unknown=True)
        assert result == {"success": False, "status": status, "requeued": 0, "in_doubt": 0,
                          "message": f"Broadcast is {status}; only a finished (sent or "
                                     "failed) broadcast can be retried"}
    assert support.progress(conn, sending)["pending"] == 3


def test_rate_after_a_retry_counts_that_run_only(conn: Conn) -> None:
    """Issue 31: `rate` averaged from the first start, over the wait before the retry too."""
    bid, ids, _ = finished_with(conn, ["sent", "failed", "failed", "unknown"])
    # the first run started two hours ago and ended an hour later
    conn.execute("UPDATE broadcasts SET started_at = now() - interval '2 hours', "
                 "finished_at = now() - interval '1 hour' WHERE id = %s", (bid,))

    def progress() -> dict[str, Any]:
        row = conn.execute(QUERIES["api_progress"], {"account": "default", "id": bid}).fetchone()
        assert row is not None
        return api_progress.progress_json(dict(row))

    assert progress()["rate"] == round(4 / 3600, 2)  # the first run: 4 finished in an hour
    assert schedule.retry(conn, "default", bid)["requeued"] == 2
    row = conn.execute("SELECT epoch_started_at, epoch_done, started_at, now() AS now "
                       "FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert row is not None
    # sent and unknown were finished before the retry; started_at stays the first start
    assert row["epoch_done"] == 2
    assert row["now"] - dt.timedelta(minutes=1) < row["epoch_started_at"] <= row["now"]
    assert row["started_at"] < row["now"] - dt.timedelta(hours=1)
    assert progress()["rate"] == 0.0  # nothing finished yet in this run
    token, claimed = dispatch.claim(conn, bid, 10)
    dispatch.handoff(conn, bid, claimed[0]["epoch"], token, ids[1:3])
    dispatch.record(conn, bid, token, ids[1:3], "sent")
    conn.execute(QUERIES["finalize"], {"id": bid})
    done = conn.execute("SELECT finished_at - epoch_started_at AS took FROM broadcasts "
                        "WHERE id = %s", (bid,)).fetchone()
    assert done is not None
    took = max(done["took"].total_seconds(), 0.001)
    p = progress()
    assert (p["status"], p["sent"]) == ("sent", 3)
    # 2 recipients over this run's own time; from the first start it was 4 over 2 hours
    assert p["rate"] == round(2 / took, 2)
    assert p["rate"] > 1.0
