"""A retry racing retention, and a late answer after a retry (issue 24, items 4 and 6).

Each interleaving is forced with real sessions: one holds a lock, the test waits until the
other is blocked on it (pg_stat_activity), never guessing with a sleep.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from pgcast.sql import retention, schedule
from pgcast.sql.queries import QUERIES
from pgcast.worker import ses
from tests import support
from tests.integration import test_dispatch as d
from tests.integration.test_fences import backend_pid, waiting_or_done
from tests.integration.test_retention import age, partition_attached, sent_broadcast

Conn = psycopg.Connection[dict[str, Any]]
DAY = 86400.0  # seconds
TERMINAL = ("sent", "failed", "skipped", "unknown", "cancelled")


def retried_row(conn: Conn, bid: uuid.UUID) -> dict[str, Any]:
    row = conn.execute("SELECT status FROM broadcast_recipients_all WHERE broadcast_id = %s "
                       "AND status NOT IN ('sent')", (bid,)).fetchone()
    assert row is not None
    return row


def archived_non_terminal(conn: Conn, bid: uuid.UUID) -> int:
    row = conn.execute("SELECT count(*) AS n FROM broadcast_recipients_archive "
                       "WHERE broadcast_id = %s AND status <> ALL (%s)",
                       (bid, list(TERMINAL))).fetchone()
    assert row is not None
    return int(row["n"])


def test_a_retry_after_retention_listed_a_broadcast_is_never_archived_pending(
        db_url: str, conn: Conn) -> None:
    """Retention lists a finished broadcast; a retry puts its failed row back to pending;
    retention detaches the partition; a worker's empty claim finalizes it. Before 0013 the
    finalize saw no rows and marked it sent, and the archive kept the row `pending`."""
    support.seed_contacts(conn, 3)
    bid = sent_broadcast(conn, 3, failed=1)
    age(conn, bid, 100)
    assert [b["id"] for b in retention.candidates(conn, 90 * DAY)] == [bid]
    assert schedule.retry(conn, "default", bid)["success"]
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as holder, \
            psycopg.connect(db_url, autocommit=True,
                            row_factory=psycopg.rows.dict_row) as ret:
        # holds the broadcast row against the archive's FOR UPDATE, not against a finalize
        holder.execute("SELECT 1 FROM broadcasts WHERE id = %s FOR KEY SHARE", (bid,))
        # the pid before the thread takes `ret`: asked after, it waits for the connection the
        # blocked archive holds, and the test hangs
        pid = backend_pid(ret)  # type: ignore[arg-type]
        thread, out = d.in_thread(lambda: retention.archive_one(ret, bid))  # type: ignore[arg-type]
        support.wait_for(waiting_or_done(conn, pid, out),  # type: ignore[arg-type]
                         what="retention to block on the broadcast row, or to give up")
        # a worker's claim comes back empty (the partition is gone) and it finalizes
        conn.execute(QUERIES["finalize"], {"id": bid})
        holder.commit()
        thread.join(30)
    assert "error" not in out
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["pending"]) == ("sending", 1)
    assert partition_attached(conn, bid) and archived_non_terminal(conn, bid) == 0
    assert retried_row(conn, bid)["status"] == "pending"
    row = conn.execute("SELECT archived_at FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert row == {"archived_at": None}


def test_a_broadcast_retention_has_begun_to_archive_refuses_a_retry(db_url: str,
                                                                    conn: Conn) -> None:
    """Retention decided (its partition is being detached and archived): a retry that comes
    then is refused, and says why, instead of requeuing a row the archive then keeps pending."""
    support.seed_contacts(conn, 3)
    bid = sent_broadcast(conn, 3, failed=1)
    age(conn, bid, 100)
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as holder, \
            psycopg.connect(db_url, autocommit=True,
                            row_factory=psycopg.rows.dict_row) as ret:
        holder.execute("SELECT 1 FROM broadcasts WHERE id = %s FOR KEY SHARE", (bid,))
        # the pid before the thread takes `ret`: asked after, it waits for the connection the
        # blocked archive holds, and the test hangs
        pid = backend_pid(ret)  # type: ignore[arg-type]
        thread, out = d.in_thread(lambda: retention.archive_one(ret, bid))  # type: ignore[arg-type]
        support.wait_for(waiting_or_done(conn, pid, out),  # type: ignore[arg-type]
                         what="retention to block on the broadcast row")
        assert "at" not in out  # detached, and waiting to archive
        answer = schedule.retry(conn, "default", bid)
        holder.commit()
        thread.join(30)
    assert out.get("result") == 3
    assert not answer["success"] and "archived" in answer["message"]
    p = support.progress(conn, bid)  # the rows are in the archive now
    assert (p["status"], p["pending"], p["failed"]) == ("sent", 0, 1)
    assert archived_non_terminal(conn, bid) == 0


def test_finalize_does_not_finish_a_broadcast_whose_rows_it_cannot_see(conn: Conn) -> None:
    """Finalize checks the counters too: a retried broadcast whose partition is detached
    (a retention run, a DBA) has a pending row that no query of the parent table sees."""
    support.seed_contacts(conn, 3)
    bid = sent_broadcast(conn, 3, failed=1)
    assert schedule.retry(conn, "default", bid)["success"]
    part = conn.execute("SELECT pgcast_partition_name_v1(%s) AS p", (bid,)).fetchone()
    assert part is not None
    conn.execute(f"ALTER TABLE broadcast_recipients DETACH PARTITION {part['p']}")  # type: ignore[arg-type]
    assert conn.execute(QUERIES["finalize"], {"id": bid}).fetchall() == []
    assert support.progress(conn, bid)["status"] == "sending"


def unknown_broadcast(conn: Conn, n: int) -> tuple[uuid.UUID, list[int], uuid.UUID]:
    """n rows handed off by a worker that then went silent: the sweeper made them unknown and
    the broadcast finished failed (nobody known sent)."""
    support.seed_contacts(conn, n)
    bid = support.new_broadcast(conn)
    token, rows = d.claim(conn, bid, n)
    ids = sorted(r["contact_id"] for r in rows)
    d.handoff(conn, bid, rows[0]["epoch"], token, ids)
    d.expire(conn, bid, token)
    conn.execute(QUERIES["sweep_one"], {"id": bid})
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["unknown"]) == ("failed", n)
    return bid, ids, token


def handed_ago(conn: Conn, bid: uuid.UUID, ids: list[int], seconds: float) -> None:
    conn.execute("UPDATE broadcast_recipients SET handed_at = clock_timestamp() "
                 "- make_interval(secs => %s) WHERE broadcast_id = %s AND contact_id = ANY (%s)",
                 (seconds, bid, ids))


def audit(conn: Conn, bid: uuid.UUID, action: str) -> list[dict[str, Any]]:
    row = conn.execute("SELECT audit_log FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert row is not None
    return [e for e in row["audit_log"] if e["action"] == action]


def test_include_unknown_leaves_rows_whose_call_may_still_be_answered(conn: Conn) -> None:
    """An unknown row handed off less than the lease plus the provider's timeout ago may
    still get its answer: `--include-unknown` leaves it, and says so."""
    bid, ids, _ = unknown_broadcast(conn, 2)
    old, recent = ids
    handed_ago(conn, bid, [old], schedule.in_doubt_seconds() + 60)
    handed_ago(conn, bid, [recent], 5)
    answer = schedule.retry(conn, "default", bid, include_unknown=True)
    assert (answer["success"], answer["requeued"]) == (True, 1)
    assert answer["in_doubt"] == 1
    assert "1 unknown recipients were handed off too recently" in answer["message"]
    counts = support.status_counts(conn, bid)
    assert (counts.get("pending"), counts.get("unknown")) == (1, 1)
    [entry] = audit(conn, bid, "retry")
    assert entry["details"]["in_doubt"] == 1
    # nothing but the recent row: refused, and the answer says why
    answer = schedule.retry(conn, "default", bid, include_unknown=True)
    assert (answer["success"], answer["status"]) == (False, "sending")


def test_the_in_doubt_window_is_the_lease_plus_the_provider_timeout() -> None:
    assert schedule.PROVIDER_TIMEOUT == ses.CONNECT_TIMEOUT + ses.READ_TIMEOUT
    assert schedule.in_doubt_seconds() >= schedule.DEFAULT_LEASE + schedule.PROVIDER_TIMEOUT


def requeued_then_one_reclaimed(conn: Conn) -> tuple[uuid.UUID, int, int, uuid.UUID, uuid.UUID]:
    """Two unknown rows of a first claim that retry --include-unknown requeued while the
    first call was still out; then another claim took one of them (b) and handed it off:
    (broadcast, a, b, first claim's token, second's)."""
    bid, ids, first = unknown_broadcast(conn, 2)
    a, b = ids
    handed_ago(conn, bid, ids, schedule.in_doubt_seconds() + 60)
    assert schedule.retry(conn, "default", bid, include_unknown=True)["requeued"] == 2
    conn.execute("UPDATE broadcast_recipients SET retry_at = clock_timestamp() + "
                 "interval '1 hour' WHERE broadcast_id = %s AND contact_id = %s", (bid, a))
    second, rows = d.claim(conn, bid, 10)
    assert [r["contact_id"] for r in rows] == [b]
    assert [r["contact_id"] for r in d.handoff(conn, bid, rows[0]["epoch"], second, [b])] == [b]
    return bid, a, b, first, second


def test_a_late_answer_after_a_retry_is_recorded_and_audited(conn: Conn) -> None:
    """retry --include-unknown requeued two rows whose first call then answers `sent`. The
    row nobody claimed again is recorded sent (no second email); the one already handed off
    again keeps its new call, and the answer is in the audit log. Before 0013 the late
    record matched no row and left no trace."""
    bid, a, b, first, second = requeued_then_one_reclaimed(conn)
    # the first worker's calls answer now
    late = d.record(conn, bid, first, [a, b], "sent")
    assert late["recorded"] == 1
    row = conn.execute("SELECT status, provider_message_id FROM broadcast_recipients "
                       "WHERE broadcast_id = %s AND contact_id = %s", (bid, a)).fetchone()
    assert row == {"status": "sent", "provider_message_id": f"m{a}"}
    [entry] = audit(conn, bid, "late_answer")
    assert entry["details"]["claim_token"] == str(first)
    assert entry["details"]["answers"] == [
        {"contact_id": a, "outcome": "sent", "provider_message_id": f"m{a}",
         "row_status": "pending", "recorded": True},
        {"contact_id": b, "outcome": "sent", "provider_message_id": f"m{b}",
         "row_status": "sending", "recorded": False}]
    # a is never claimed again; b's own call is recorded as usual
    assert d.claim(conn, bid, 10)[1] == []
    d.record(conn, bid, second, [b], "sent")
    assert conn.execute(QUERIES["finalize"], {"id": bid}).fetchone() == {
        "ok": True, "status": "sent"}
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["unknown"]) == (2, 0)


def test_a_late_answer_after_a_reconcile_requeue_is_recorded(conn: Conn) -> None:
    """The reconcile requeue (0016) cleared the claim token: the first call's late `sent`
    then matched nothing, and the row was sent a second time. It keeps it, as a retry does."""
    from pgcast.worker import reconcile

    bid, ids, first = unknown_broadcast(conn, 1)
    handed_ago(conn, bid, ids, 3600)
    assert [r["requeued"] for r in reconcile.requeue(conn, 60.0, bid)] == [1]
    late = d.record(conn, bid, first, ids, "sent")
    assert late["recorded"] == 1
    assert d.claim(conn, bid, 10)[1] == []  # nobody mails them again
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["unknown"], p["pending"]) == (1, 0, 0)
