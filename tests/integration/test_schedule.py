"""Scheduled sends: schedule/unschedule CAS, the start of due broadcasts, copy."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import threading
import uuid
from typing import Any

import psycopg
import pytest

from pgcast.sql import broadcasts, errors, schedule
from pgcast.sql.queries import QUERIES
from pgcast.worker import starter
from tests import support

Conn = psycopg.Connection[dict[str, Any]]


def iso(delta_seconds: float) -> str:
    """A time relative to now, ISO 8601 with an offset."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delta_seconds)).isoformat()


def audit(conn: Conn, bid: uuid.UUID) -> list[dict[str, Any]]:
    row = conn.execute("SELECT audit_log FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert row is not None
    return list(row["audit_log"])


def row_of(conn: Conn, bid: uuid.UUID) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert row is not None
    return dict(row)


def test_schedule_and_unschedule_are_compare_and_set_with_audit(conn: Conn) -> None:
    bid = support.new_broadcast(conn, send=False)
    result = schedule.schedule(conn, "default", bid, iso(3600), iso(7200), {"via": "test"})
    assert result["success"] and result["status"] == "scheduled"
    assert result["message"].startswith("Scheduled for ")
    again = schedule.schedule(conn, "default", bid, iso(60))
    assert again == {"success": False, "status": "scheduled",
                     "message": "Broadcast is scheduled; only a draft can be scheduled"}
    b = row_of(conn, bid)
    assert b["scheduled_at"] == result["scheduled_at"] and b["not_after"] == result["not_after"]
    back = schedule.unschedule(conn, "default", bid, {"via": "test"})
    assert back == {"success": True, "status": "draft", "message": "Unscheduled; back to draft"}
    b = row_of(conn, bid)
    assert (b["status"], b["scheduled_at"], b["not_after"]) == ("draft", None, None)
    assert schedule.unschedule(conn, "default", bid)["success"] is False
    entries = [(e["action"], e["from"], e["to"]) for e in audit(conn, bid)]
    assert entries[-2:] == [("schedule", "draft", "scheduled"),
                            ("unschedule", "scheduled", "draft")]
    assert audit(conn, bid)[-2]["details"]["via"] == "test"


@pytest.mark.parametrize(("at", "not_after", "message"), [
    ("2026-12-24T09:00:00", None, "has no offset"),
    ("tomorrow", None, "is not an ISO 8601 time"),
    ("", None, "must be an ISO 8601 time with an offset"),
    (None, None, "must be an ISO 8601 time with an offset"),
    ("2020-01-01T00:00:00+00:00", None, "is in the past"),
    ("x" * 100, None, "too long"),
    ("+3600", "+60", "not_after must not be earlier than at"),
])
def test_bad_times_are_refused_and_change_nothing(conn: Conn, at: Any, not_after: Any,
                                                  message: str) -> None:
    bid = support.new_broadcast(conn, send=False)
    at = iso(float(at)) if isinstance(at, str) and at.startswith("+") else at
    not_after = iso(float(not_after[1:])) if not_after else None
    with pytest.raises(errors.InvalidInput, match=message):
        schedule.schedule(conn, "default", bid, at, not_after)
    assert row_of(conn, bid)["status"] == "draft"


def test_a_time_less_than_a_minute_ago_is_accepted(conn: Conn) -> None:
    bid = support.new_broadcast(conn, send=False)
    assert schedule.schedule(conn, "default", bid, iso(-30))["success"]


def test_cancel_takes_a_scheduled_broadcast_and_it_never_starts(conn: Conn) -> None:
    support.seed_contacts(conn, 5)
    bid = support.new_broadcast(conn, send=False)
    schedule.schedule(conn, "default", bid, iso(-1))
    result = broadcasts.cancel(conn, "default", bid)
    assert result["success"] and result["alreadyQueued"] == 0
    assert starter.start_due(conn) == []
    assert row_of(conn, bid)["status"] == "cancelled"
    assert support.status_counts(conn, bid) == {}


def test_a_due_broadcast_starts_once_through_the_send(conn: Conn) -> None:
    support.seed_contacts(conn, 20)
    bid = support.new_broadcast(conn, send=False)
    later = support.new_broadcast(conn, send=False)
    schedule.schedule(conn, "default", bid, iso(-5))
    schedule.schedule(conn, "default", later, iso(3600))
    support.seed_contacts(conn, 3, start=100)  # joins after scheduling: in the snapshot
    started = starter.start_due(conn)
    assert [(r["broadcast_id"], r["status"], r["queued"], r["reason"]) for r in started] == [
        (bid, "sending", 23, None)]
    assert started[0]["lateness_seconds"] >= 5
    assert starter.start_due(conn) == []
    assert row_of(conn, later)["status"] == "scheduled"
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["total"]) == ("sending", 23)
    starts = [e for e in audit(conn, bid) if e["to"] == "sending"]
    assert len(starts) == 1
    entry = starts[0]
    assert (entry["action"], entry["from"]) == ("send", "scheduled")
    assert entry["details"]["recipients"] == 23
    assert entry["details"]["lateness_seconds"] >= 5
    assert {"scheduled_at", "started_at", "not_after"} <= set(entry["details"])


def test_a_start_later_than_not_after_fails_missed_window(conn: Conn) -> None:
    support.seed_contacts(conn, 5)
    bid = support.new_broadcast(conn, send=False)
    schedule.schedule(conn, "default", bid, iso(-40), iso(-20))
    started = starter.start_due(conn)
    assert [(r["status"], r["queued"], r["reason"]) for r in started] == [
        ("failed", 0, "missed_window")]
    b = row_of(conn, bid)
    assert (b["status"], b["failed_reason"], b["total"]) == ("failed", "missed_window", 0)
    shown = broadcasts.progress(conn, "default", bid)  # what `broadcast status` prints
    assert (shown["status"], shown["failed_reason"]) == ("failed", "missed_window")
    assert shown["scheduled_at"] is not None
    assert b["finished_at"] is not None
    entry = audit(conn, bid)[-1]
    assert (entry["action"], entry["from"], entry["to"]) == ("start", "scheduled", "failed")
    assert entry["details"]["reason"] == "missed_window"
    assert support.status_counts(conn, bid) == {}


def test_an_empty_segment_at_start_fails_empty_segment(conn: Conn) -> None:
    support.seed_contacts(conn, 3, tag="vip")
    bid = support.new_broadcast(conn, send=False, tag="vip")
    schedule.schedule(conn, "default", bid, iso(-1))
    # everyone in the segment left it before the start time
    conn.execute("UPDATE contacts SET unsubscribed_at = now() WHERE 'vip' = ANY (tags)")
    [started] = starter.start_due(conn)
    assert (started["status"], started["reason"]) == ("failed", "empty_segment")
    b = row_of(conn, bid)
    assert (b["status"], b["failed_reason"], b["total"]) == ("failed", "empty_segment", 0)


def test_start_due_skips_a_broadcast_another_sweeper_is_starting(db_url: str,
                                                                 conn: Conn) -> None:
    support.seed_contacts(conn, 5)
    first = support.new_broadcast(conn, send=False)
    second = support.new_broadcast(conn, send=False)
    schedule.schedule(conn, "default", first, iso(-20))
    schedule.schedule(conn, "default", second, iso(-10))
    with psycopg.connect(db_url) as other:
        # another sweeper is starting the first one: its row stays locked until commit (a
        # real second start would also wait here: two sends attach partitions one at a time)
        other.execute("SELECT 1 FROM broadcasts WHERE id = %s FOR UPDATE", (first,))
        theirs = starter.start_due(conn)
        other.commit()
    assert [r["broadcast_id"] for r in theirs] == [second]
    assert [r["broadcast_id"] for r in starter.start_due(conn)] == [first]
    assert starter.start_due(conn) == []
    for bid in (first, second):
        assert support.progress(conn, bid)["total"] == 5


def edit_subject(conn: Conn, bid: object, subject: str) -> dict[str, object] | None:
    return conn.execute(QUERIES["broadcast_update_draft"], {
        "account": "default", "id": bid, "subject": subject, "from_address": None,
        "set_text": False, "text_body": None, "set_html": False, "html_body": None,
        "set_tag": False, "segment_tag": None, "set_filter": False, "segment_filter": None,
        "priority": None, "details": "{}"}).fetchone()


def test_edits_need_a_draft_or_a_scheduled_broadcast(conn: Conn) -> None:
    """A scheduled broadcast is edited until it starts (it keeps its time); one that has
    started never is."""
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn, send=False)
    at = schedule.schedule(conn, "default", bid, iso(3600))["scheduled_at"]
    row = edit_subject(conn, bid, "fixed")
    assert row is not None and (row["status"], row["scheduled_at"]) == ("scheduled", at)
    schedule.unschedule(conn, "default", bid)
    broadcasts.send(conn, "default", bid)
    assert edit_subject(conn, bid, "too late") is None
    assert row_of(conn, bid)["subject"] == "fixed"


def test_copy_makes_a_new_draft_with_the_same_content(conn: Conn) -> None:
    support.seed_contacts(conn, 4, tag="vip")
    bid = support.new_broadcast(conn, tag="vip")
    new = schedule.copy(conn, "default", bid, {"via": "test"})
    assert new["id"] != bid and new["status"] == "draft" and new["total"] == 0
    old = row_of(conn, bid)
    for k in ("subject", "from_address", "text_body", "html_body", "segment_tag", "rate_limit",
              "priority"):
        assert new[k] == old[k], k
    assert new["audit_log"][0]["details"] == {"via": "test", "copied_from": str(bid)}
    with pytest.raises(errors.NotFound):
        schedule.copy(conn, "other", bid)


def test_list_shows_scheduled_at(conn: Conn) -> None:
    bid = support.new_broadcast(conn, send=False)
    result = schedule.schedule(conn, "default", bid, iso(3600))
    [listed] = broadcasts.list_page(conn, "default")
    assert listed["scheduled_at"] == result["scheduled_at"]


def test_concurrent_sweepers_start_each_due_broadcast_once(db_url: str, conn: Conn) -> None:
    support.seed_contacts(conn, 30)
    due = [support.new_broadcast(conn, send=False) for _ in range(6)]
    for i, bid in enumerate(due):
        schedule.schedule(conn, "default", bid, iso(-30 + i))
    barrier = threading.Barrier(4)

    def sweeper() -> list[dict[str, Any]]:
        with support.connect(db_url) as own:
            barrier.wait()
            return starter.start_due(own)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(sweeper) for _ in range(4)]]
    started = [r["broadcast_id"] for rows in results for r in rows]
    assert sorted(started) == sorted(due)  # each once, by one sweeper or another
    for bid in due:
        p = support.assert_counters_true(conn, bid)
        assert (p["status"], p["total"]) == ("sending", 30)
        assert [e["action"] for e in audit(conn, bid)].count("send") == 1
