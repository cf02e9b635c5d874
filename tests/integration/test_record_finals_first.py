"""Issue 32: the record writes a group's final answers before it locks the broadcast row
(pgcast_record_v7).

v6 locked the broadcast row first and held it through its whole UPDATE, so the records of
every loop of every worker took turns on that one row. v7 writes the rows whose answer is
final (sent, failed, unknown: what they become does not depend on the broadcast's status)
first, then takes the broadcast row for everything else and the counters. A deadlock of that
first step (an erase holds the broadcast row and rewrites a row the record already holds)
that Postgres ends by rolling the record back lets its rows go, and the record is done again
the v6 way; a lease renewal passes over the rows a record holds.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from pgcast.sql.queries import QUERIES
from pgcast.worker import dispatch
from tests import support
from tests.integration import test_dispatch as d
from tests.integration.test_dispatch import claim_handoff, in_thread
from tests.integration.test_fences import backend_pid, connect, waiting_or_done
from tests.integration.test_record_one_pass import held_rows
from tests.integration.test_retry_races import audit, requeued_then_one_reclaimed

Conn = psycopg.Connection[dict[str, Any]]


def statuses(conn: Conn, bid: uuid.UUID) -> dict[int, str]:
    return {r["contact_id"]: r["status"] for r in conn.execute(
        "SELECT contact_id, status FROM broadcast_recipients WHERE broadcast_id = %s",
        (bid,)).fetchall()}


def deadlocks(conn: Conn) -> int:
    """Deadlocks Postgres detected in this database so far (its statistics, flushed)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute("SELECT deadlocks FROM pg_stat_database "
                       "WHERE datname = current_database()").fetchone()
    assert row is not None
    return int(row["deadlocks"])


def record_in_thread(recorder: Conn, bid: uuid.UUID, token: uuid.UUID,
                     outcomes: list[dispatch.Outcome],
                     deadlock_timeout: str | None = None) -> tuple[Any, dict[str, Any]]:
    def run() -> Any:
        if deadlock_timeout is not None:  # in the record's own transaction
            recorder.execute("SELECT set_config('deadlock_timeout', %s, true)",
                             (deadlock_timeout,))
        row = recorder.execute(QUERIES["record"],
                               dispatch.record_params(bid, token, outcomes, 0)).fetchone()
        recorder.commit()
        return row
    return in_thread(run)


def test_final_answers_are_written_while_another_session_holds_the_broadcast_row(
        db_url: str, conn: Conn) -> None:
    """Another session holds the broadcast row, as another group's record does while it
    writes its counters: the record has already written (and holds) its group's rows when it
    waits for it. v6 waited holding nothing, so records of two groups never overlapped."""
    support.seed_contacts(conn, 5)
    bid = support.new_broadcast(conn)
    token, rows = claim_handoff(conn, bid, 5)
    ids = sorted(r["contact_id"] for r in rows)
    outcomes = [dispatch.Outcome(cid, "sent", message_id=f"m{cid}") for cid in ids[:4]]
    outcomes.append(dispatch.Outcome(ids[4], "failed", error="rejected"))
    with connect(db_url) as blocker, connect(db_url) as probe, connect(db_url) as recorder:
        blocker.execute("SELECT 1 FROM broadcasts WHERE id = %s FOR NO KEY UPDATE", (bid,))
        pid = backend_pid(recorder)
        t, out = record_in_thread(recorder, bid, token, outcomes)
        try:
            support.wait_for(waiting_or_done(conn, pid, out))
            assert "at" not in out, out  # it waits for the broadcast row
            assert held_rows(probe, bid, ids) == ids
        finally:
            blocker.commit()
            t.join(30)
    assert out.get("result") is not None and out["result"]["recorded"] == 5, out
    got = statuses(conn, bid)
    assert [got[c] for c in ids] == ["sent"] * 4 + ["failed"]
    p = support.progress(conn, bid)
    assert (p["sent"], p["failed"]) == (4, 1)


def test_answers_that_depend_on_the_status_wait_for_a_cancel_and_follow_it(
        db_url: str, conn: Conn) -> None:
    """A cancel holds the broadcast row (uncommitted) while a group is recorded. The final
    answers are written at once; a retry, and a sent row whose lease ends within a second (the
    sweeper may be about to take it), wait for the broadcast row. Once the cancel commits,
    the retry's row becomes `cancelled`, not `pending` (a pending row in a cancelled broadcast
    would never be sent nor finished), and the counters equal the rows."""
    support.seed_contacts(conn, 6)
    bid = support.new_broadcast(conn)
    token, rows = claim_handoff(conn, bid, 4)
    ids = sorted(r["contact_id"] for r in rows)
    soon = ids[3]
    conn.execute("UPDATE broadcast_recipients SET lease_expires_at = clock_timestamp() "
                 "+ interval '0.8 s' WHERE broadcast_id = %s AND contact_id = %s", (bid, soon))
    outcomes = [dispatch.Outcome(ids[0], "sent", message_id="m0"),
                dispatch.Outcome(ids[1], "unknown", error="timed out"),
                dispatch.Outcome(ids[2], "retry", error="busy", retry_in=5.0),
                dispatch.Outcome(soon, "sent", message_id="m3")]
    account = conn.execute("SELECT account FROM broadcasts WHERE id = %s",
                           (bid,)).fetchone()
    assert account is not None
    with connect(db_url) as canceller, connect(db_url) as probe, connect(db_url) as recorder:
        row = canceller.execute("SELECT * FROM pgcast_cancel_v3(%s, %s, '{}')",
                                (account["account"], bid)).fetchone()
        assert row is not None and row["ok"]
        pid = backend_pid(recorder)
        t, out = record_in_thread(recorder, bid, token, outcomes)
        try:
            support.wait_for(waiting_or_done(conn, pid, out))
            assert "at" not in out, out
            assert held_rows(probe, bid, ids) == ids[:2]
        finally:
            canceller.commit()
            t.join(30)
    assert out.get("result") is not None and out["result"]["recorded"] == 4, out
    got = statuses(conn, bid)
    assert [got[c] for c in ids] == ["sent", "unknown", "cancelled", "sent"]
    assert sorted(s for c, s in got.items() if c not in ids) == ["cancelled", "cancelled"]
    p = support.progress(conn, bid)
    assert (p["status"], p["sent"], p["unknown"], p["cancelled"]) == ("cancelled", 2, 1, 3)


def test_a_deadlock_of_the_first_step_falls_back_to_the_broadcast_row_first(
        db_url: str, conn: Conn) -> None:
    """An erase's pattern: a session locks the broadcast row FOR UPDATE, then rewrites the
    erased contact's recipient row, which the record's first step already holds; the record
    then waits for the broadcast row. The record, the last to wait, finds the deadlock; it
    lets its rows go, the rewrite goes on, and once it commits the record writes the whole
    group the v6 way: nothing is lost, the counters equal the rows.

    Made certain by a third session holding the group's second row: the first step takes
    the first row and waits there, the eraser comes to wait for that first row, and only
    then is the second row let go, so the record's wait for the broadcast row closes the
    cycle (Postgres checks for a deadlock once, deadlock_timeout after a wait begins)."""
    support.seed_contacts(conn, 6)
    bid = support.new_broadcast(conn)
    token, rows = claim_handoff(conn, bid, 4)
    ids = sorted(r["contact_id"] for r in rows)
    outcomes = [dispatch.Outcome(cid, "sent", message_id=f"m{cid}") for cid in ids]
    before = deadlocks(conn)
    with connect(db_url) as eraser, connect(db_url) as holder, \
            connect(db_url) as recorder:
        eraser.execute("SET LOCAL deadlock_timeout = '60s'")
        holder.execute("SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s "
                       "AND contact_id = %s FOR UPDATE", (bid, ids[1]))
        eraser.execute("SELECT 1 FROM broadcasts WHERE id = %s FOR UPDATE", (bid,))
        rec_pid, erase_pid = backend_pid(recorder), backend_pid(eraser)
        t, out = record_in_thread(recorder, bid, token, outcomes, deadlock_timeout="100ms")
        support.wait_for(waiting_or_done(conn, rec_pid, out))
        assert "at" not in out, out  # the record waits for the second row
        te, erased = in_thread(lambda: eraser.execute(
            "UPDATE broadcast_recipients SET email = 'erased@erased.invalid' "
            "WHERE broadcast_id = %s AND contact_id = %s", (bid, ids[0])))
        try:
            support.wait_for(waiting_or_done(conn, erase_pid, erased))
            assert "at" not in erased, erased  # the eraser waits for the first
            holder.rollback()
            te.join(30)
            assert "error" not in erased, erased  # the record let its rows go
        finally:
            holder.rollback()
            eraser.commit()
            te.join(30)
            t.join(30)
        assert out.get("result") is not None and out["result"]["recorded"] == 4, out
        # the same session's next record takes the first step (its counts keep their types)
        token2, rows2 = claim_handoff(conn, bid, 2)
        outcomes2 = [dispatch.Outcome(r["contact_id"], "sent", message_id=f"m{r['contact_id']}")
                     for r in rows2]
        again = recorder.execute(QUERIES["record"],
                                 dispatch.record_params(bid, token2, outcomes2, 0)).fetchone()
        recorder.commit()
        assert again is not None and again["recorded"] == 2
    got = conn.execute("SELECT contact_id, status, email, provider_message_id "
                       "FROM broadcast_recipients WHERE broadcast_id = %s ORDER BY contact_id",
                       (bid,)).fetchall()[:4]
    assert [r["status"] for r in got] == ["sent"] * 4
    assert [r["provider_message_id"] for r in got] == [f"m{c}" for c in ids]
    assert got[0]["email"] == "erased@erased.invalid"
    p = support.assert_counters_true(conn, bid)
    assert p["sent"] == 6
    # there was one, and the record rode it out (a backend's statistics reach the view
    # when it reports them, at most once a second, or when it exits)
    support.wait_for(lambda: deadlocks(conn) == before + 1, what="the deadlock counted")


def test_a_late_answer_for_a_row_another_claim_holds_is_audited_without_waiting(
        conn: Conn, db_url: str) -> None:
    """retry --include-unknown requeued two rows whose first call is still out; another claim
    took one of them and is recording it (its first step holds the row while it waits for the
    broadcast row). The first call's answers come: the row nobody claimed again is recorded
    sent, and the other is audited without waiting for it. This branch's first v7 locked
    every late row while it held the broadcast row, and so waited for the other record, which
    waited for it (v6's records took the broadcast row first: none held rows meanwhile)."""
    bid, a, b, first, second = requeued_then_one_reclaimed(conn)
    with connect(db_url) as other_record, connect(db_url) as recorder:
        other_record.execute("SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s "
                             "AND contact_id = %s FOR UPDATE", (bid, b))
        pid = backend_pid(recorder)
        t, out = record_in_thread(recorder, bid, first, [
            dispatch.Outcome(a, "sent", message_id=f"m{a}"),
            dispatch.Outcome(b, "sent", message_id=f"m{b}")])
        try:
            support.wait_for(waiting_or_done(conn, pid, out))
            assert "at" in out, "the late answer waited for the other claim's row"
        finally:
            other_record.rollback()
            t.join(30)
    assert out.get("result") is not None and out["result"]["recorded"] == 1, out
    [entry] = audit(conn, bid, "late_answer")
    assert entry["details"]["answers"] == [
        {"contact_id": a, "outcome": "sent", "provider_message_id": f"m{a}",
         "row_status": "pending", "recorded": True},
        {"contact_id": b, "outcome": "sent", "provider_message_id": f"m{b}",
         "row_status": "sending", "recorded": False}]
    d.record(conn, bid, second, [b], "sent")
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["unknown"]) == (2, 0)


def test_a_lease_renewal_passes_over_the_rows_a_record_holds(db_url: str, conn: Conn) -> None:
    """A worker holds two claims of one broadcast: A only claimed (lower ids), B handed off
    and being recorded (its first step holds B's rows while it waits for the broadcast row).
    The lease renewal (pgcast_renew_v4) renews A's rows and passes over B's without waiting.
    v3 waited for them holding A's rows: with a handoff of A holding the broadcast row and
    waiting for A's rows, that closed a cycle (renewal -> record -> handoff -> renewal)."""
    support.seed_contacts(conn, 6)
    bid = support.new_broadcast(conn)
    token_a, rows_a = d.claim(conn, bid, 3)
    token_b, rows_b = claim_handoff(conn, bid, 3)
    ids_a = sorted(r["contact_id"] for r in rows_a)
    ids_b = sorted(r["contact_id"] for r in rows_b)
    assert max(ids_a) < min(ids_b)
    outcomes = [dispatch.Outcome(cid, "sent", message_id=f"m{cid}") for cid in ids_b]
    with connect(db_url) as blocker, connect(db_url) as recorder, \
            connect(db_url) as renewer:
        blocker.execute("SELECT 1 FROM broadcasts WHERE id = %s FOR NO KEY UPDATE", (bid,))
        pid = backend_pid(recorder)
        t, out = record_in_thread(recorder, bid, token_b, outcomes)
        try:
            support.wait_for(waiting_or_done(conn, pid, out))
            assert "at" not in out, out  # waits for the broadcast row, holding B's rows
            renew_pid = backend_pid(renewer)
            tr, renewed = in_thread(lambda: renewer.execute(QUERIES["renew"], {
                "ids": [bid, bid], "tokens": [token_a, token_b], "lease": 600.0}).fetchone())
            support.wait_for(waiting_or_done(conn, renew_pid, renewed))
            assert "at" in renewed, "the renewal waited for the rows the record holds"
            renewer.commit()
            tr.join(30)
        finally:
            blocker.commit()
            t.join(30)
    assert renewed.get("result") == {"renewed": 3}, renewed
    assert out.get("result") is not None and out["result"]["recorded"] == 3, out
    long = {r["contact_id"]: r["long"] for r in conn.execute(
        "SELECT contact_id, lease_expires_at > clock_timestamp() + interval '500 s' AS long "
        "FROM broadcast_recipients WHERE broadcast_id = %s AND contact_id = ANY (%s)",
        (bid, ids_a)).fetchall()}
    assert long == dict.fromkeys(ids_a, True)
    got = statuses(conn, bid)
    assert [got[c] for c in ids_a + ids_b] == ["claimed"] * 3 + ["sent"] * 3
