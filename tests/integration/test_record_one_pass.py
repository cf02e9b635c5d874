"""Issue 32: the record in one pass (pgcast_record_v6) and its parameters as array literals.

The record no longer locks its group in a separate `SELECT … FOR UPDATE` pass: the UPDATE
locks the rows itself, through a merge join, so in contact_id order (renew locks a claim's
rows in that order without the broadcast row; two orders would deadlock). The worker passes
the record's arrays as literals (worker.dispatch.text_array / number_array): any text must
come back exactly as it was.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from pgcast.sql.queries import QUERIES
from pgcast.worker import dispatch
from tests import support
from tests.integration.test_dispatch import claim_handoff, in_thread
from tests.integration.test_fences import backend_pid, connect, waiting_or_done

Conn = psycopg.Connection[dict[str, Any]]

NASTY = ["", "NULL", "null", "a,b", "{x}", '"quoted"', "back\\slash", "\\\"", "new\nline",
         " spaced ", "tab\there", "it's", "é ü 日本 ✉", "}{,\"\\", None, "x" * 600]


def test_text_arrays_round_trip_any_text(conn: Conn) -> None:
    row = conn.execute("SELECT %s::text[] AS a", (dispatch.text_array(NASTY),)).fetchone()
    assert row is not None and row["a"] == NASTY
    row = conn.execute("SELECT %s::text[] AS a", (dispatch.text_array([]),)).fetchone()
    assert row is not None and row["a"] == []
    # the one-pass cases: all NULL, nothing to escape, and one element to escape among plain
    for values in ([None] * 3, ["NULL", "null-1-2", "a,b", "{x}", "é", ""], [""],
                   ["plain", 'a"b'], ["plain", "a\\b"], ["x", None]):
        literal = dispatch.text_array(values)
        row = conn.execute("SELECT %s::text[] AS a", (literal,)).fetchone()
        assert row is not None and row["a"] == values, literal


def test_number_arrays_round_trip(conn: Conn) -> None:
    ids = [1, 2**62, 42]
    floats = [0.0, 1.5, 1e-05, 300.0, 2.5e10, 0.1 + 0.2]
    row = conn.execute("SELECT %s::bigint[] AS i, %s::double precision[] AS f",
                       (dispatch.number_array(ids), dispatch.number_array(floats))).fetchone()
    assert row is not None and row["i"] == ids and row["f"] == floats


def test_a_record_stores_each_outcome_and_error_text_exactly(conn: Conn) -> None:
    """Through the worker's own parameters: every row gets its outcome, message id and error
    text as they were, and the counters follow."""
    texts = [t for t in NASTY if t]
    support.seed_contacts(conn, len(texts) + 2)
    bid = support.new_broadcast(conn)
    token, rows = claim_handoff(conn, bid, len(texts) + 2)
    ids = sorted(r["contact_id"] for r in rows)
    assert all(r["handed"] for r in rows)
    outcomes = [dispatch.Outcome(cid, "failed", error=text)
                for cid, text in zip(ids, texts, strict=False)]
    outcomes.append(dispatch.Outcome(ids[-2], "sent", message_id='id "with" \\ quotes'))
    outcomes.append(dispatch.Outcome(ids[-1], "retry", error="later, {maybe}", retry_in=2.5))
    row = conn.execute(QUERIES["record"],
                       dispatch.record_params(bid, token, outcomes, 0)).fetchone()
    assert row is not None and row["recorded"] == len(ids)
    got = {r["contact_id"]: r for r in conn.execute(
        "SELECT contact_id, status, last_error, provider_message_id, retry_at - clock_timestamp()"
        " AS wait FROM broadcast_recipients WHERE broadcast_id = %s", (bid,)).fetchall()}
    for o in outcomes:
        want = "pending" if o.outcome == "retry" else o.outcome
        assert got[o.contact_id]["status"] == want
        assert got[o.contact_id]["last_error"] == o.error
        assert got[o.contact_id]["provider_message_id"] == o.message_id
    assert 0 < got[ids[-1]]["wait"].total_seconds() <= 2.5
    p = support.progress(conn, bid)
    assert (p["sent"], p["failed"]) == (1, len(texts))


def held_rows(probe: Conn, bid: uuid.UUID, ids: list[int]) -> list[int]:
    """The rows of `ids` another session holds locked (probed with FOR UPDATE NOWAIT)."""
    held = []
    for cid in ids:
        probe.execute("BEGIN")
        try:
            probe.execute("SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s "
                          "AND contact_id = %s FOR UPDATE NOWAIT", (bid, cid))
        except psycopg.errors.LockNotAvailable:
            held.append(cid)
        probe.execute("ROLLBACK")
    return held


@pytest.mark.parametrize("order", ["descending", "shuffled"])
def test_the_record_locks_its_rows_in_contact_id_order(db_url: str, conn: Conn,
                                                       order: str) -> None:
    """Another session holds the middle row of a group; the record, given the ids in any
    order, waits there holding exactly the rows below it: it took them in contact_id order,
    renew's order (a record that took the top rows first could deadlock with a renew)."""
    support.seed_contacts(conn, 7)
    bid = support.new_broadcast(conn)
    token, rows = claim_handoff(conn, bid, 7)
    ids = sorted(r["contact_id"] for r in rows)
    given = ids[::-1] if order == "descending" else [ids[i] for i in (4, 0, 6, 2, 5, 1, 3)]
    middle = ids[3]
    with connect(db_url) as blocker, connect(db_url) as probe:
        blocker.execute("BEGIN")
        blocker.execute("SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s "
                        "AND contact_id = %s FOR UPDATE", (bid, middle))
        with connect(db_url) as recorder:
            pid = backend_pid(recorder)
            outcomes = [dispatch.Outcome(cid, "sent", message_id=f"m{cid}") for cid in given]
            t, out = in_thread(lambda: recorder.execute(
                QUERIES["record"], dispatch.record_params(bid, token, outcomes, 0)).fetchone())
            try:
                support.wait_for(waiting_or_done(conn, pid, out))
                assert "at" not in out, out  # it waits on the middle row
                assert held_rows(probe, bid, [c for c in ids if c != middle]) == ids[:3]
            finally:
                blocker.execute("COMMIT")
                t.join(30)
        assert out.get("result") is not None and out["result"]["recorded"] == 7, out
    statuses = conn.execute("SELECT status, count(*) AS n FROM broadcast_recipients "
                            "WHERE broadcast_id = %s GROUP BY status", (bid,)).fetchall()
    assert [(r["status"], r["n"]) for r in statuses] == [("sent", 7)]
    assert support.progress(conn, bid)["sent"] == 7
