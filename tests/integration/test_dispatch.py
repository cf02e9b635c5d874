"""Claim, the handoff fence, record and sweep, driven statement by statement on real rows."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from pgcast.sql import broadcasts, contacts
from pgcast.sql.queries import QUERIES
from pgcast.worker import sweeper
from tests import support

Conn = psycopg.Connection[dict[str, Any]]


def claim(conn: Conn, bid: uuid.UUID, n: int, lease: float = 30.0, after: int = 0,
          query: str = "claim", contact: bool = True) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    token = uuid.uuid4()
    rows = conn.execute(QUERIES[query], {"id": bid, "limit": n, "token": token,
                                         "worker": "test", "lease": lease,
                                         "after": after, "contact": contact}).fetchall()
    return token, rows


def handoff(conn: Conn, bid: uuid.UUID, epoch: int, token: uuid.UUID,
            ids: list[int], contact: bool = True) -> list[dict[str, Any]]:
    return conn.execute(QUERIES["handoff"], {"id": bid, "epoch": epoch, "token": token,
                                             "ids": ids, "contact": contact}).fetchall()


def record(conn: Conn, bid: uuid.UUID, token: uuid.UUID, ids: list[int], outcome: str,
           breaker: int = 0) -> dict[str, Any]:
    row = conn.execute(QUERIES["record"], {
        "id": bid, "token": token, "ids": ids, "outcomes": [outcome] * len(ids),
        "message_ids": [f"m{i}" if outcome == "sent" else None for i in ids],
        "errors": [None if outcome == "sent" else "boom" for _ in ids],
        "retry_in": [0.0] * len(ids), "breaker": breaker}).fetchone()
    assert row is not None
    return row


def expire(conn: Conn, bid: uuid.UUID, *tokens: uuid.UUID) -> None:
    """The leases of these claims run out (their worker stopped renewing them)."""
    conn.execute("UPDATE broadcast_recipients SET lease_expires_at = clock_timestamp() "
                 "- interval '1 second' WHERE broadcast_id = %s AND claim_token = ANY (%s)",
                 (bid, list(tokens)))


def claim_handoff(conn: Conn, bid: uuid.UUID, n: int, after: int = 0,
                  contact: bool = True) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    return claim(conn, bid, n, after=after, query="claim_handoff", contact=contact)


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run fn in a thread; its result or exception lands in the returned dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as exc:  # the test asserts on it
            out["error"] = exc
        out["at"] = time.monotonic()

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_claim_takes_disjoint_rows_under_skip_locked(db_url: str, conn: Conn) -> None:
    support.seed_contacts(conn, 100)
    bid = support.new_broadcast(conn)
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as other:
        # other's claim is uncommitted: its rows stay locked while we claim
        _, theirs = claim(other, bid, 30)  # type: ignore[arg-type]
        _, ours = claim(conn, bid, 100)
        other.commit()
    assert len(theirs) == 30 and len(ours) == 70
    assert not {r["contact_id"] for r in theirs} & {r["contact_id"] for r in ours}
    assert support.status_counts(conn, bid) == {"claimed": 100}


def test_claim_limit_is_exact(conn: Conn) -> None:
    support.seed_contacts(conn, 50)
    bid = support.new_broadcast(conn)
    _, rows = claim(conn, bid, 7)
    assert len(rows) == 7
    assert support.status_counts(conn, bid) == {"claimed": 7, "pending": 43}


def recipient_ids(conn: Conn, bid: uuid.UUID) -> list[int]:
    return [r["contact_id"] for r in conn.execute(
        "SELECT contact_id FROM broadcast_recipients WHERE broadcast_id = %s ORDER BY 1",
        (bid,)).fetchall()]


def fresh_floor(conn: Conn, bid: uuid.UUID, start: int = 0) -> int | None:
    row = conn.execute(QUERIES["fresh_floor"], {"id": bid, "from": start}).fetchone()
    assert row is not None
    return row["floor"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("query", ["claim", "claim_handoff"])
def test_fresh_rows_come_after_the_cursor_and_report_where_it_moves(conn: Conn,
                                                                    query: str) -> None:
    support.seed_contacts(conn, 10)
    bid = support.new_broadcast(conn)
    ids = recipient_ids(conn, bid)
    _, rows = claim(conn, bid, 3, after=ids[4], query=query)
    assert sorted(r["contact_id"] for r in rows) == ids[5:8]
    assert {r["last_fresh"] for r in rows} == {ids[7]}
    _, rows = claim(conn, bid, 100, after=ids[7], query=query)
    assert sorted(r["contact_id"] for r in rows) == ids[8:]
    # nothing fresh after the cursor: the rows behind it are not looked at
    assert claim(conn, bid, 100, after=ids[9], query=query)[1] == []
    assert fresh_floor(conn, bid) == ids[0]
    _, rows = claim(conn, bid, 100, after=ids[0] - 1, query=query)
    assert sorted(r["contact_id"] for r in rows) == ids[:5]
    assert fresh_floor(conn, bid) is None


def test_requeued_rows_are_claimed_before_fresh_ones(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = support.new_broadcast(conn)
    ids = recipient_ids(conn, bid)
    token, rows = claim(conn, bid, 4)
    released = conn.execute(QUERIES["release"], {"id": bid, "token": token,
                                                 "ids": ids[1:3]}).fetchone()
    assert released == {"released": 2}
    # released rows are back to pending but not fresh: the requeued index has them
    assert fresh_floor(conn, bid) == ids[4]
    _, rows = claim(conn, bid, 3, after=ids[3])
    assert sorted(r["contact_id"] for r in rows) == [ids[1], ids[2], ids[4]]
    assert {r["last_fresh"] for r in rows} == {ids[4]}
    # requeued rows alone fill the claim: the cursor stays where it was
    token, rows = claim(conn, bid, 2, after=ids[4])
    assert sorted(r["contact_id"] for r in rows) == ids[5:7]
    conn.execute(QUERIES["release"], {"id": bid, "token": token, "ids": ids[5:7]})
    _, rows = claim(conn, bid, 2, after=ids[6])
    assert sorted(r["contact_id"] for r in rows) == ids[5:7]
    assert {r["last_fresh"] for r in rows} == {ids[6]}


def test_the_fresh_floor_answers_as_the_walk_did_from_every_start(conn: Conn) -> None:
    """fresh_floor v2 (a walk over the next 10,000 ids, the heap read beyond them) gives v1's
    answer from every start: fresh rows on both sides of claimed ones, near and far (ids in
    three clusters 20,000 apart), past the last id, near the largest bigint, none left."""
    for cluster in range(3):
        support.seed_contacts(conn, 4, start=cluster * 10)
        conn.execute("SELECT setval(pg_get_serial_sequence('contacts', 'id'), "
                     "(SELECT max(id) FROM contacts) + 20000)")
    bid = support.new_broadcast(conn)
    ids = recipient_ids(conn, bid)
    assert ids[4] - ids[3] > 10_000 and ids[8] - ids[7] > 10_000
    claim(conn, bid, 4, after=0)  # the first cluster: the next fresh row is 20,000 ids on
    claim(conn, bid, 2, after=ids[4])  # ids[5:7], a fresh row on either side

    def both(start: int) -> tuple[int | None, int | None]:
        walked = conn.execute("SELECT pgcast_fresh_floor_v1(%s, %s) AS f",
                              (bid, start)).fetchone()
        assert walked is not None
        return walked["f"], fresh_floor(conn, bid, start)

    starts = sorted({0, *ids, *(i + 1 for i in ids), *(i - 5_000 for i in ids),
                     *(i - 15_000 for i in ids), ids[-1] + 1, 2**63 - 5})
    answers = [both(s) for s in starts]
    assert [v2 for _, v2 in answers] == [v1 for v1, _ in answers]
    assert both(0) == (ids[4], ids[4]) and both(ids[5]) == (ids[7], ids[7])
    assert both(ids[-1] + 1) == (None, None) and both(2**63 - 5) == (None, None)
    claim(conn, bid, 100, after=0)
    assert both(0) == (None, None)


def mark_claimed_sent(conn: Conn, bid: uuid.UUID) -> None:
    """Claimed rows sent, and counted (finalize checks the counters too)."""
    conn.execute("WITH u AS (UPDATE broadcast_recipients SET status = 'sent' "
                 "WHERE broadcast_id = %s AND status = 'claimed' RETURNING 1) "
                 "UPDATE broadcasts SET sent = sent + (SELECT count(*) FROM u) WHERE id = %s",
                 (bid, bid))


def test_the_fresh_floor_counts_rows_another_transaction_has_locked(db_url: str,
                                                                    conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = support.new_broadcast(conn)
    ids = recipient_ids(conn, bid)
    with psycopg.connect(db_url) as holder:
        # locked as a claim that will roll back locks them
        holder.execute("SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s "
                       "AND contact_id = ANY (%s) FOR UPDATE", (bid, ids[2:4]))
        _, rows = claim(conn, bid, 100)
        assert sorted(r["contact_id"] for r in rows) == ids[:2] + ids[4:]
        assert claim(conn, bid, 100, after=ids[9])[1] == []
        assert fresh_floor(conn, bid) == ids[2]
        # nothing in flight, nothing requeued, but two rows never claimed: not finished,
        # and finalize says why
        mark_claimed_sent(conn, bid)
        assert conn.execute(QUERIES["finalize"], {"id": bid}).fetchall() == [
            {"ok": False, "status": "sending"}]
        assert sweeper.sweep_conn(conn) == []  # nor does the sweep finish it
        holder.rollback()
    _, rows = claim(conn, bid, 100, after=ids[2] - 1)
    assert sorted(r["contact_id"] for r in rows) == ids[2:4]
    mark_claimed_sent(conn, bid)
    assert fresh_floor(conn, bid) is None
    assert conn.execute(QUERIES["finalize"], {"id": bid}).fetchall() == [
        {"ok": True, "status": "sent"}]


def test_full_cycle_keeps_counters_true_and_finalizes(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 10)
    ids = [r["contact_id"] for r in rows]
    handed = handoff(conn, bid, rows[0]["epoch"], token, ids)
    assert len(handed) == 10 and {h["name"] for h in handed} >= {"User 0"}
    assert support.status_counts(conn, bid) == {"sending": 10}
    assert conn.execute(QUERIES["finalize"], {"id": bid}).fetchall() == []  # not drained
    record(conn, bid, token, ids[:8], "sent")
    record(conn, bid, token, ids[8:], "failed")
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["failed"]) == (8, 2)
    done = conn.execute(QUERIES["finalize"], {"id": bid}).fetchall()
    assert done == [{"ok": True, "status": "sent"}]


def test_unsubscribed_after_send_is_skipped_at_handoff(conn: Conn) -> None:
    support.seed_contacts(conn, 5)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 5)
    contacts.unsubscribe(conn, "default", "user2@example.com")
    handed = handoff(conn, bid, rows[0]["epoch"], token, [r["contact_id"] for r in rows])
    assert "user2@example.com" not in {h["email"] for h in handed} and len(handed) == 4
    p = support.assert_counters_true(conn, bid)
    assert p["skipped"] == 1
    skipped = conn.execute("SELECT email, last_error FROM broadcast_recipients "
                           "WHERE status = 'skipped'").fetchall()
    assert skipped == [{"email": "user2@example.com", "last_error": "unsubscribed"}]


def test_cancel_after_claim_wins_over_the_handoff(conn: Conn) -> None:
    support.seed_contacts(conn, 20)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 10)
    result = broadcasts.cancel(conn, "default", bid)
    assert result["success"] and result["alreadyQueued"] == 0
    assert handoff(conn, bid, rows[0]["epoch"], token, [r["contact_id"] for r in rows]) == []
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["cancelled"]) == ("cancelled", 20)


def test_cancel_counts_what_was_already_handed_off(conn: Conn) -> None:
    support.seed_contacts(conn, 20)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 10)
    ids = [r["contact_id"] for r in rows]
    handoff(conn, bid, rows[0]["epoch"], token, ids)
    record(conn, bid, token, ids[:4], "sent")
    result = broadcasts.cancel(conn, "default", bid)
    assert result["alreadyQueued"] == 10  # 4 sent + 6 in flight
    record(conn, bid, token, ids[4:], "sent")  # the in-flight group finishes
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["cancelled"], p["pending"]) == (10, 10, 0)


def test_claim_handoff_hands_off_in_one_statement(conn: Conn) -> None:
    support.seed_contacts(conn, 12)
    bid = support.new_broadcast(conn)
    contacts.unsubscribe(conn, "default", "user3@example.com")
    token, rows = claim_handoff(conn, bid, 10)
    assert [r["contact_id"] for r in rows] == sorted(r["contact_id"] for r in rows)
    assert len(rows) == 10 and {r["epoch"] for r in rows} == {1}
    assert [r["email"] for r in rows if not r["handed"]] == ["user3@example.com"]
    assert support.status_counts(conn, bid) == {"sending": 9, "claimed": 1, "pending": 2}
    assert conn.execute("SELECT count(*) AS n FROM broadcast_recipients WHERE status = "
                        "'sending' AND handed_at IS NULL").fetchone() == {"n": 0}
    handed = [r["contact_id"] for r in rows if r["handed"]]
    record(conn, bid, token, handed, "sent")
    # the unsubscribed one goes through the ordinary handoff, which skips it
    assert handoff(conn, bid, 1, token, [r["contact_id"] for r in rows if not r["handed"]]) == []
    token2, rest = claim_handoff(conn, bid, 10, after=rows[-1]["contact_id"])
    record(conn, bid, token2, [r["contact_id"] for r in rest], "sent")
    assert claim_handoff(conn, bid, 10)[1] == []
    conn.execute(QUERIES["finalize"], {"id": bid})
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["sent"], p["skipped"]) == ("sent", 11, 1)


def test_unhandoff_puts_back_everything_a_lost_claim_handoff_took(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = support.new_broadcast(conn)
    contacts.unsubscribe(conn, "default", "user3@example.com")
    token, rows = claim_handoff(conn, bid, 6)
    other, theirs = claim_handoff(conn, bid, 4, after=rows[-1]["contact_id"])
    conn.execute(QUERIES["unhandoff"], {"id": bid, "token": token, "ids": None})
    counts = conn.execute(
        "SELECT status, count(*) AS n, count(handed_at) AS handed, count(claim_token) AS held "
        "FROM broadcast_recipients GROUP BY 1 ORDER BY 1").fetchall()
    # ours (one of them only claimed) are pending and unmarked; the other claim's are not
    assert counts == [{"status": "pending", "n": 6, "handed": 0, "held": 0},
                      {"status": "sending", "n": 4, "handed": 4, "held": 4}]
    assert len(theirs) == 4 and other != token


def test_a_pause_waits_for_a_claim_handoff_in_progress(db_url: str, conn: Conn) -> None:
    support.seed_contacts(conn, 20)
    bid = support.new_broadcast(conn)
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as worker:
        _, rows = claim_handoff(worker, bid, 8)  # type: ignore[arg-type]
        assert len(rows) == 8  # handed off, not yet committed
        t, out = in_thread(lambda: broadcasts.pause(conn, "default", bid))
        time.sleep(0.5)
        assert t.is_alive(), "the pause must wait for the handoff in progress"
        committed = time.monotonic()
        worker.commit()
        t.join(10)
    assert out["result"]["success"] and out["at"] >= committed
    # the handoff committed first; nothing can be handed off after the pause
    assert claim_handoff(conn, bid, 20)[1] == []
    assert support.status_counts(conn, bid) == {"sending": 8, "pending": 12}


def test_a_claim_handoff_that_waited_for_a_pause_hands_off_nothing(db_url: str,
                                                                  conn: Conn) -> None:
    support.seed_contacts(conn, 20)
    bid = support.new_broadcast(conn)
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as operator:
        assert broadcasts.pause(operator, "default", bid)["success"]  # type: ignore[arg-type]
        t, out = in_thread(lambda: claim_handoff(conn, bid, 20))
        time.sleep(0.5)
        assert t.is_alive(), "the handoff must wait for the pause in progress"
        operator.commit()
        t.join(10)
    assert out["result"][1] == []
    assert support.status_counts(conn, bid) == {"pending": 20}


def test_a_cancel_counts_a_claim_handoff_that_committed_first(db_url: str, conn: Conn) -> None:
    support.seed_contacts(conn, 20)
    bid = support.new_broadcast(conn)
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as worker:
        _, rows = claim_handoff(worker, bid, 8)  # type: ignore[arg-type]
        t, out = in_thread(lambda: broadcasts.cancel(conn, "default", bid))
        time.sleep(0.5)
        assert t.is_alive(), "the cancel must wait for the rows the handoff holds"
        worker.commit()
        t.join(10)
    assert out["result"]["success"] and out["result"]["alreadyQueued"] == 8
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["cancelled"]) == ("cancelled", 12)
    assert support.status_counts(conn, bid) == {"sending": 8, "cancelled": 12}


def test_a_retry_recorded_after_a_cancel_ends_cancelled(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 6)
    ids = [r["contact_id"] for r in rows]
    handoff(conn, bid, rows[0]["epoch"], token, ids)
    assert broadcasts.cancel(conn, "default", bid)["alreadyQueued"] == 6
    # the group in the provider's hands comes back: 3 sent, 3 to be retried
    record(conn, bid, token, ids[:3], "sent")
    record(conn, bid, token, ids[3:], "retry")
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["cancelled"], p["pending"]) == (3, 7, 0)
    assert support.status_counts(conn, bid) == {"sent": 3, "cancelled": 7}


def test_unhandoff_after_a_cancel_ends_cancelled(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = support.new_broadcast(conn)
    token, rows = claim_handoff(conn, bid, 4)
    assert broadcasts.cancel(conn, "default", bid)["alreadyQueued"] == 4
    undone = conn.execute(QUERIES["unhandoff"], {"id": bid, "token": token, "ids": None})
    assert undone.fetchone() == {"undone": 4}
    p = support.assert_counters_true(conn, bid)
    assert (p["cancelled"], p["pending"]) == (10, 0)


def test_resume_fences_work_claimed_before_the_pause(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 5)
    epoch = rows[0]["epoch"]
    assert broadcasts.pause(conn, "default", bid)["success"]
    assert support.status_counts(conn, bid) == {"pending": 10}  # claims went back
    # a claim that raced the pause and committed after it
    conn.execute("UPDATE broadcast_recipients SET status = 'claimed', claim_token = %s "
                 "WHERE contact_id = ANY(%s)", (token, [r["contact_id"] for r in rows]))
    assert broadcasts.resume(conn, "default", bid)["success"]
    assert handoff(conn, bid, epoch, token, [r["contact_id"] for r in rows]) == []
    token2, rows2 = claim(conn, bid, 10)
    assert {r["epoch"] for r in rows2} == {epoch + 1}


def test_sweep_reclaims_expired_claims_and_marks_lost_handoffs_unknown(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = support.new_broadcast(conn)
    t1, rows1 = claim(conn, bid, 4)
    t2, rows2 = claim(conn, bid, 6)
    handoff(conn, bid, rows2[0]["epoch"], t2, [r["contact_id"] for r in rows2])
    expire(conn, bid, t1, t2)
    swept = sweeper.sweep_conn(conn)
    assert swept == [{"broadcast_id": bid, "reclaimed": 4, "unknown": 6, "finalized": None}]
    p = support.assert_counters_true(conn, bid)
    assert p["unknown"] == 6
    # the lost worker's late answer still lands, correcting unknown to sent
    record(conn, bid, t2, [r["contact_id"] for r in rows2], "sent")
    p = support.assert_counters_true(conn, bid)
    assert (p["unknown"], p["sent"]) == (0, 6)
    # the reclaimed rows are claimable again; a stale token cannot hand them off
    assert handoff(conn, bid, rows1[0]["epoch"], t1, [r["contact_id"] for r in rows1]) == []
    t3, rows3 = claim(conn, bid, 10)
    assert len(rows3) == 4


def test_a_retry_that_arrives_after_the_broadcast_finished_ends_failed(conn: Conn) -> None:
    support.seed_contacts(conn, 4)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 4)
    ids = sorted(r["contact_id"] for r in rows)
    handoff(conn, bid, rows[0]["epoch"], token, ids)
    expire(conn, bid, token)
    # the worker is slow, not dead: its lease runs out, the sweeper counts the rows unknown
    # and, everything being accounted for, finishes the broadcast
    swept = sweeper.sweep_conn(conn)
    # nothing is known to have been sent: it finishes failed
    assert swept == [{"broadcast_id": bid, "reclaimed": 0, "unknown": 4, "finalized": "failed"}]
    # then the provider's answers arrive: two sent, two throttled
    conn.execute(QUERIES["record"], {"id": bid, "token": token, "ids": ids,
                                     "outcomes": ["sent", "sent", "throttled", "retry"],
                                     "message_ids": ["m1", "m2", None, None],
                                     "errors": [None, None, "slow down", "timeout"],
                                     "retry_in": [0.0, 0.0, 5.0, 5.0], "breaker": 0})
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["sent"], p["failed"], p["unknown"], p["pending"]) == (
        "sent", 2, 2, 0, 0)
    errors = conn.execute("SELECT last_error FROM broadcast_recipients WHERE broadcast_id = %s "
                          "AND status = 'failed' ORDER BY contact_id", (bid,)).fetchall()
    assert [e["last_error"] for e in errors] == [
        "broadcast finished before the throttled: slow down",
        "broadcast finished before the retry: timeout"]


def test_finalize_waits_for_a_late_retry_that_puts_an_unknown_row_back(db_url: str,
                                                                      conn: Conn) -> None:
    support.seed_contacts(conn, 3)
    bid = support.new_broadcast(conn)
    slow, rows = claim(conn, bid, 1)
    late = [r["contact_id"] for r in rows]
    handoff(conn, bid, rows[0]["epoch"], slow, late)
    expire(conn, bid, slow)
    token, rows = claim(conn, bid, 2, lease=60)
    ids = [r["contact_id"] for r in rows]
    handoff(conn, bid, rows[0]["epoch"], token, ids)
    swept = sweeper.sweep_conn(conn)  # the slow worker's row: unknown
    assert swept == [{"broadcast_id": bid, "reclaimed": 0, "unknown": 1, "finalized": None}]
    record(conn, bid, token, ids, "sent")  # nothing in flight now
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as slow_worker:
        # the slow worker's answer, a retry, is being recorded: the row goes back to pending
        record(slow_worker, bid, slow, late, "retry")  # type: ignore[arg-type]
        def finalize() -> list[dict[str, Any]]:
            with support.connect(db_url) as other:
                return other.execute(QUERIES["finalize"], {"id": bid}).fetchall()

        t, out = in_thread(finalize)
        time.sleep(0.5)
        assert t.is_alive()  # it saw the row unknown, and waits for the broadcast row
        slow_worker.commit()
        t.join(10)
    assert out.get("result") == [], out  # not finished: a recipient is pending again
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["pending"], p["sent"], p["unknown"]) == ("sending", 1, 2, 0)


def test_renew_extends_only_the_claims_named_by_broadcast_and_token(conn: Conn) -> None:
    support.seed_contacts(conn, 20)
    a, b = support.new_broadcast(conn), support.new_broadcast(conn)
    # the same physical row positions in both partitions: a ctid match alone would be wrong
    ta, rows_a = claim(conn, a, 5)
    tb, rows_b = claim(conn, b, 5)
    t_other, _ = claim(conn, a, 5)
    sent = [rows_a[0]["contact_id"]]
    handoff(conn, a, rows_a[0]["epoch"], ta, sent)
    expire(conn, a, ta, t_other)
    expire(conn, b, tb)
    renewed = conn.execute(QUERIES["renew"], {"ids": [a, b, b], "tokens": [ta, tb, ta],
                                             "lease": 60.0}).fetchone()
    assert renewed == {"renewed": 10}  # (b, ta) names nothing
    leases = conn.execute(
        "SELECT broadcast_id, claim_token, bool_and(lease_expires_at > clock_timestamp() "
        "+ interval '50 seconds') AS long FROM broadcast_recipients "
        "WHERE claim_token IS NOT NULL GROUP BY 1, 2").fetchall()
    assert {(r["broadcast_id"], r["claim_token"]): r["long"] for r in leases} == {
        (a, ta): True, (b, tb): True, (a, t_other): False}
    # renewed claims survive a sweep; the unrenewed one goes back to pending
    swept = sweeper.sweep_conn(conn)
    assert swept == [{"broadcast_id": a, "reclaimed": 5, "unknown": 0, "finalized": None}]
    assert support.status_counts(conn, b) == {"claimed": 5, "pending": 15}
    assert {r["contact_id"] for r in rows_b} == {
        r["contact_id"] for r in conn.execute(
            "SELECT contact_id FROM broadcast_recipients WHERE broadcast_id = %s "
            "AND claim_token = %s", (b, tb))}


def test_each_broadcast_gets_its_own_partition_and_an_empty_send_none(conn: Conn) -> None:
    support.seed_contacts(conn, 10, tag="vip")
    support.seed_contacts(conn, 5, start=100)
    everyone = support.new_broadcast(conn)
    vips = support.new_broadcast(conn, tag="vip")
    nobody = support.new_broadcast(conn, tag="no-such-tag", send=False)
    assert broadcasts.send(conn, "default", nobody, allow_empty=True)["status"] == "sent"
    rows = conn.execute(
        "SELECT c.relname AS part, (SELECT count(*) FROM broadcast_recipients r"
        "  WHERE r.tableoid = c.oid) AS n FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'broadcast_recipients'::regclass").fetchall()
    counts = {r["part"]: r["n"] for r in rows}
    assert counts == {f"broadcast_recipients_{everyone.hex}": 15,
                      f"broadcast_recipients_{vips.hex}": 10}
    p = support.assert_counters_true(conn, nobody)
    assert (p["status"], p["total"]) == ("sent", 0)
    # partitions live with their parent, whatever the sender's search_path says
    conn.execute("CREATE SCHEMA elsewhere")
    conn.execute("SET search_path = elsewhere, public")
    there = support.new_broadcast(conn)
    row = conn.execute("SELECT relnamespace::regnamespace::text AS nsp FROM pg_class "
                       "WHERE relname = %s", (f"broadcast_recipients_{there.hex}",)).fetchone()
    assert row == {"nsp": "public"}
    assert support.assert_counters_true(conn, there)["total"] == 15


def test_sweep_finalizes_a_drained_broadcast_whose_last_recipient_failed(conn: Conn) -> None:
    support.seed_contacts(conn, 3)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 3)
    ids = [r["contact_id"] for r in rows]
    handoff(conn, bid, rows[0]["epoch"], token, ids)
    record(conn, bid, token, ids, "failed")
    swept = sweeper.sweep_conn(conn)
    assert swept == [{"broadcast_id": bid, "reclaimed": 0, "unknown": 0, "finalized": "failed"}]


def test_retry_goes_back_to_pending_with_a_later_retry_at(conn: Conn) -> None:
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 2)
    ids = [r["contact_id"] for r in rows]
    handoff(conn, bid, rows[0]["epoch"], token, ids)
    conn.execute(QUERIES["record"], {"id": bid, "token": token, "ids": ids,
                                     "outcomes": ["retry", "throttled"],
                                     "message_ids": [None, None], "errors": ["e1", "e2"],
                                     "retry_in": [60.0, 60.0], "breaker": 0})
    rows = conn.execute("SELECT status, attempts, retry_at > now() AS later "
                        "FROM broadcast_recipients ORDER BY contact_id").fetchall()
    assert rows == [{"status": "pending", "attempts": 1, "later": True},
                    {"status": "pending", "attempts": 0, "later": True}]
    assert claim(conn, bid, 10)[1] == []  # not before retry_at
    # nothing claimable and nothing in flight, but not finished: the retries are waiting
    assert conn.execute(QUERIES["finalize"], {"id": bid}).fetchall() == []
    conn.execute("UPDATE broadcast_recipients SET retry_at = now() - interval '1 second' "
                 "WHERE contact_id = %s", (ids[0],))
    _, rows = claim(conn, bid, 10)
    assert [r["contact_id"] for r in rows] == [ids[0]]


def test_circuit_breaker_trips_after_consecutive_failures(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 10)
    ids = [r["contact_id"] for r in rows]
    handoff(conn, bid, rows[0]["epoch"], token, ids)
    assert record(conn, bid, token, ids[:3], "failed", breaker=5)["tripped"] is False
    assert record(conn, bid, token, ids[3:5], "sent", breaker=5)["tripped"] is False
    assert record(conn, bid, token, ids[5:], "failed", breaker=4)["tripped"] is True


@pytest.mark.parametrize("contact", [True, False])
def test_attributes_and_tags_come_only_for_a_content_that_reads_them(conn: Conn,
                                                                     contact: bool) -> None:
    """claim_handoff (v6) and handoff (v4): the same rows, fences and names either way; the
    attributes and tags only with `contact` (issue 32: a content that never reads `contact`
    does not pay for decoding them)."""
    support.seed_contacts(conn, 4, tag="vip")
    conn.execute("UPDATE contacts SET attributes = '{\"plan\": \"pro\"}'")
    bid = support.new_broadcast(conn)
    ids = recipient_ids(conn, bid)
    _, direct = claim_handoff(conn, bid, 2, contact=contact)
    token, claimed = claim(conn, bid, 2, after=max(r["contact_id"] for r in direct))
    handed = handoff(conn, bid, claimed[0]["epoch"], token,
                     [r["contact_id"] for r in claimed], contact=contact)
    rows = direct + handed
    assert sorted(r["contact_id"] for r in rows) == ids
    assert all(r["handed"] for r in direct)
    assert {(r["email"], r["name"]) for r in rows} == {
        (f"user{i}@example.com", f"User {i}") for i in range(4)}
    if contact:
        assert all(r["attributes"] == {"plan": "pro"} and r["tags"] == ["vip"] for r in rows)
    else:
        assert all(r["attributes"] is None and r["tags"] is None for r in rows)
    statuses = conn.execute("SELECT DISTINCT status FROM broadcast_recipients "
                            "WHERE broadcast_id = %s", (bid,)).fetchall()
    assert statuses == [{"status": "sending"}]
