"""Issue 11 §3: fences that hold under every interleaving, forced with real connections.

Each test drives two or three real sessions into the order that broke a fence on 0004's
functions, then asserts on the rows. A session that must wait is observed waiting in
pg_stat_activity (never guessed with a sleep).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgcast.sql.queries import QUERIES
from pgcast.worker import sweeper
from tests import support
from tests.integration.test_dispatch import claim, handoff, in_thread, record

Conn = psycopg.Connection[dict[str, Any]]


def backend_pid(conn: Conn) -> int:
    row = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()
    assert row is not None
    return int(row["pid"])


def waiting_or_done(watch: Conn, pid: int, out: dict[str, Any]) -> Callable[[], bool]:
    """True once session `pid` waits for a lock, or its statement has finished."""
    def check() -> bool:
        if "at" in out:
            return True
        row = watch.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                            (pid,)).fetchone()
        return row is not None and row["wait_event_type"] == "Lock"
    return check


def epoch_of(conn: Conn, bid: uuid.UUID) -> int:
    row = conn.execute("SELECT epoch FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert row is not None
    return int(row["epoch"])


def connect(db_url: str) -> Conn:
    return psycopg.connect(db_url, row_factory=psycopg.rows.dict_row)


def test_an_unsubscribe_that_commits_during_a_handoff_wins(db_url: str, conn: Conn) -> None:
    """The handoff waits on a recipient row lock; an unsubscribe commits meanwhile. 0004's
    handoff read the contact from its snapshot and handed the row off anyway."""
    support.seed_contacts(conn, 3)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 3)
    ids = sorted(r["contact_id"] for r in rows)
    victim = ids[0]
    email = conn.execute("SELECT email FROM contacts WHERE id = %s", (victim,)).fetchone()
    assert email is not None
    with connect(db_url) as blocker, connect(db_url) as hand, connect(db_url) as unsub:
        # blocker holds the victim's recipient row: the handoff will wait on it
        blocker.execute("SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s AND "
                        "contact_id = %s FOR UPDATE", (bid, victim))
        hand_pid = backend_pid(hand)
        t_hand, out_hand = in_thread(lambda: (handoff(hand, bid, epoch_of(conn, bid), token, ids),
                                              hand.commit()))
        support.wait_for(waiting_or_done(conn, hand_pid, out_hand))
        unsub_pid = backend_pid(unsub)
        t_unsub, out_unsub = in_thread(lambda: (unsub.execute(
            QUERIES["contact_unsubscribe"], {"account": "default", "email": email["email"],
                                             "source": "sql", "actor": "{}"}),
            unsub.commit()))
        support.wait_for(waiting_or_done(conn, unsub_pid, out_unsub))
        unsub_first = "at" in out_unsub  # committed while the handoff was still running
        blocker.commit()
        t_hand.join(30)
        t_unsub.join(30)
    assert "error" not in out_hand and "error" not in out_unsub, (out_hand, out_unsub)
    status = conn.execute("SELECT status FROM broadcast_recipients WHERE broadcast_id = %s "
                          "AND contact_id = %s", (bid, victim)).fetchone()
    assert status is not None
    if unsub_first:
        # the unsubscribe committed before the handoff did: the handoff must have seen it
        assert status["status"] == "skipped"
    else:
        # it waited for the handoff: the handoff came first, legitimately
        assert out_unsub["at"] >= out_hand["at"]
        assert status["status"] == "sending"
    assert unsub_first is False, "an unsubscribe must wait for a handoff that reads it"
    support.assert_counters_true(conn, bid)


def test_a_pause_that_commits_during_a_claim_and_handoff_wins(db_url: str, conn: Conn) -> None:
    """A claim commits while a pause runs, and a handoff reads the broadcast before the
    pause commits: 0004's functions handed off rows of a paused broadcast."""
    support.seed_contacts(conn, 4)
    bid = support.new_broadcast(conn)
    epoch = epoch_of(conn, bid)
    with connect(db_url) as claimer, connect(db_url) as pauser, connect(db_url) as hand:
        token, rows = claim(claimer, bid, 4)  # uncommitted
        ids = sorted(r["contact_id"] for r in rows)
        pause_pid = backend_pid(pauser)
        t_pause, out_pause = in_thread(lambda: pauser.execute(QUERIES["broadcast_pause"], {
            "account": None, "id": bid, "reason": "operator", "details": "{}"}).fetchone())
        support.wait_for(waiting_or_done(conn, pause_pid, out_pause))
        claimer.commit()
        t_pause.join(30)  # the pause's statement is done; its transaction is still open
        assert "error" not in out_pause, out_pause
        hand_pid = backend_pid(hand)
        t_hand, out_hand = in_thread(lambda: (handoff(hand, bid, epoch, token, ids),
                                              hand.commit())[0])
        support.wait_for(waiting_or_done(conn, hand_pid, out_hand))
        pauser.commit()
        t_hand.join(30)
    assert "error" not in out_hand, out_hand
    assert out_hand["result"] == [], "a handoff after a pause committed hands off nothing"
    assert support.progress(conn, bid)["status"] == "paused"
    counts = support.status_counts(conn, bid)
    assert "sending" not in counts, counts
    # and the claimed rows went back to pending with the pause (it waited for the claim)
    assert counts == {"pending": 4}, counts
    support.assert_counters_true(conn, bid)


def test_a_handoff_under_an_expired_lease_is_refused(conn: Conn) -> None:
    """0004's handoff neither checked nor renewed the lease: the sweeper could then count
    a row unknown (and finalize) before the provider was even called."""
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 2, lease=-1.0)  # expired at once
    handed = handoff(conn, bid, epoch_of(conn, bid), token, [r["contact_id"] for r in rows])
    assert handed == []
    assert support.status_counts(conn, bid) == {"claimed": 2}
    sweeper.sweep_conn(conn)
    assert support.status_counts(conn, bid) == {"pending": 2}
    support.assert_counters_true(conn, bid)


def test_the_sweeper_never_holds_one_broadcast_while_waiting_for_another(
        db_url: str, conn: Conn) -> None:
    """0004's sweep locked every broadcast in one transaction: waiting behind a cancel of
    one broadcast, it held the rows of another, and that broadcast's records waited."""
    support.seed_contacts(conn, 4)
    first, second = sorted([support.new_broadcast(conn), support.new_broadcast(conn)])
    with connect(db_url) as holder, connect(db_url) as sweep, connect(db_url) as rec:
        holder.execute("SELECT 1 FROM broadcasts WHERE id = %s FOR UPDATE", (second,))
        sweep.autocommit = True
        sweep_pid = backend_pid(sweep)
        t_sweep, out_sweep = in_thread(lambda: sweeper.sweep_conn(sweep))
        support.wait_for(waiting_or_done(conn, sweep_pid, out_sweep))
        # the sweep waits for `second`; `first` must be free
        rec.execute("SET lock_timeout = '2s'")
        try:
            got = rec.execute("SELECT 1 AS ok FROM broadcasts WHERE id = %s "
                              "FOR NO KEY UPDATE", (first,)).fetchone()
        except psycopg.errors.LockNotAvailable:
            got = None
        rec.rollback()
        holder.commit()
        t_sweep.join(30)
    assert got == {"ok": 1}, "the sweep held another broadcast while it waited"
    assert "error" not in out_sweep, out_sweep


def test_renew_and_sweep_lock_in_one_order(db_url: str, conn: Conn) -> None:
    """0004's sweep locked expired claimed rows, then expired sending rows; renew locks
    both in contact_id order: a claimed row above a sending row made a cycle."""
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn)
    low_token, low = claim(conn, bid, 1, lease=-1.0)
    high_token, high = claim(conn, bid, 1, lease=-1.0)
    low_id, high_id = low[0]["contact_id"], high[0]["contact_id"]
    assert low_id < high_id
    # the low row is sending (its handoff went through before the lease ran out), the high
    # row only claimed; both leases have run out
    conn.execute("UPDATE broadcast_recipients SET status = 'sending' WHERE broadcast_id = %s "
                 "AND contact_id = %s", (bid, low_id))
    with connect(db_url) as holder, connect(db_url) as renewer, connect(db_url) as sweep:
        holder.execute("SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s AND "
                       "contact_id = %s FOR UPDATE", (bid, low_id))
        renew_pid = backend_pid(renewer)
        t_renew, out_renew = in_thread(lambda: (renewer.execute(QUERIES["renew"], {
            "ids": [bid, bid], "tokens": [low_token, high_token], "lease": 30.0}),
            renewer.commit()))
        support.wait_for(waiting_or_done(conn, renew_pid, out_renew))
        sweep.autocommit = True
        sweep_pid = backend_pid(sweep)
        t_sweep, out_sweep = in_thread(lambda: sweeper.sweep_conn(sweep))
        support.wait_for(waiting_or_done(conn, sweep_pid, out_sweep))
        holder.commit()
        t_renew.join(60)
        t_sweep.join(60)
    errors = [o.get("error") for o in (out_renew, out_sweep) if o.get("error")]
    assert not errors, errors
    support.assert_counters_true(conn, bid)


def test_claims_do_not_scan_rows_waiting_for_their_retry(conn: Conn) -> None:
    """0004's requeued index was keyed by contact_id: every claim read every row in retry
    backoff and filtered it out."""
    support.seed_contacts(conn, 300)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 300)
    ids = [r["contact_id"] for r in rows]
    handoff(conn, bid, epoch_of(conn, bid), token, ids)
    conn.execute(QUERIES["record"], {
        "id": bid, "token": token, "ids": ids, "outcomes": ["retry"] * len(ids),
        "message_ids": [None] * len(ids), "errors": ["later"] * len(ids),
        "retry_in": [3600.0] * len(ids), "breaker": 0})
    part = f"broadcast_recipients_{bid.hex}_requeued"
    with conn.transaction():
        _, got = claim(conn, bid, 50)
        read = conn.execute("SELECT pg_stat_get_xact_tuples_returned(%s::regclass) AS n",
                            (part,)).fetchone()
    assert got == []
    assert read is not None and read["n"] <= 1, read
    support.assert_counters_true(conn, bid)


@pytest.mark.parametrize(("outcomes", "final"), [
    (["failed", "failed"], "failed"),
    (["unknown", "failed"], "failed"),
    (["unknown", "unknown"], "failed"),
    (["sent", "failed"], "sent"),
])
def test_a_broadcast_that_reached_nobody_finishes_failed(conn: Conn, outcomes: list[str],
                                                         final: str) -> None:
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn)
    token, rows = claim(conn, bid, 2)
    ids = sorted(r["contact_id"] for r in rows)
    handoff(conn, bid, epoch_of(conn, bid), token, ids)
    for cid, outcome in zip(ids, outcomes, strict=True):
        record(conn, bid, token, [cid], outcome)
    conn.execute(QUERIES["finalize"], {"id": bid})
    assert support.progress(conn, bid)["status"] == final
    support.assert_counters_true(conn, bid)


def test_a_broadcast_whose_recipients_all_left_finishes_sent_and_says_so(conn: Conn) -> None:
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn)
    conn.execute("UPDATE contacts SET unsubscribed_at = now()")
    token, rows = claim(conn, bid, 2)
    assert handoff(conn, bid, epoch_of(conn, bid), token,
                   [r["contact_id"] for r in rows]) == []
    conn.execute(QUERIES["finalize"], {"id": bid})
    row = conn.execute("SELECT status, audit_log -> -1 AS last FROM broadcasts WHERE id = %s",
                       (bid,)).fetchone()
    assert row is not None and row["status"] == "sent"
    assert "skipped" in row["last"]["details"]["message"]
    support.assert_counters_true(conn, bid)


def test_suppressed_contacts_are_left_out_and_skipped_like_unsubscribed_ones(
        conn: Conn) -> None:
    support.seed_contacts(conn, 3)
    conn.execute("UPDATE contacts SET suppressed_at = now(), suppressed_reason = 'bounce' "
                 "WHERE email = 'user0@example.com'")
    bid = support.new_broadcast(conn)
    assert support.progress(conn, bid)["total"] == 2
    conn.execute("UPDATE contacts SET suppressed_at = now(), suppressed_reason = 'complaint' "
                 "WHERE email = 'user1@example.com'")
    token, rows = claim(conn, bid, 2)
    handed = handoff(conn, bid, epoch_of(conn, bid), token, [r["contact_id"] for r in rows])
    assert [h["email"] for h in handed] == ["user2@example.com"]
    assert set(handed[0]) >= {"contact_id", "email", "name", "attributes"}
    assert support.status_counts(conn, bid) == {"skipped": 1, "sending": 1}
    support.assert_counters_true(conn, bid)


def test_an_empty_segment_is_refused_unless_allowed(conn: Conn) -> None:
    from pgcast.sql import broadcasts

    support.seed_contacts(conn, 2)
    draft = support.new_broadcast(conn, tag="nobody-has-this", send=False)
    refused = broadcasts.send(conn, "default", draft)
    assert refused["success"] is False and refused["status"] == "empty"
    assert "nobody-has-this" in refused["message"]
    assert support.progress(conn, draft)["status"] == "draft"
    allowed = broadcasts.send(conn, "default", draft, allow_empty=True)
    assert allowed["success"] is True and allowed["status"] == "sent"


def test_handoff_cancel_pause_and_unsubscribe_pin_synchronous_commit(db_url: str) -> None:
    """With synchronous_commit = off on the database (a common tuning), each of these
    must still commit synchronously: their functions (and the contacts trigger) set it."""
    with connect(db_url) as conn:
        conn.autocommit = True
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET synchronous_commit = off")
    with connect(db_url) as conn:
        support.seed_contacts(conn, 3)
        bid = support.new_broadcast(conn)
        conn.commit()
        assert _setting(conn) == "off"
        token, rows = claim(conn, bid, 1)
        conn.commit()
        handoff(conn, bid, epoch_of(conn, bid), token, [rows[0]["contact_id"]])
        assert _setting(conn) == "on", "handoff"
        conn.rollback()
        conn.execute(QUERIES["broadcast_pause"], {"account": None, "id": bid,
                                                  "reason": "operator", "details": "{}"})
        assert _setting(conn) == "on", "pause"
        conn.rollback()
        conn.execute(QUERIES["broadcast_cancel"], {"account": "default", "id": bid,
                                                   "details": "{}"})
        assert _setting(conn) == "on", "cancel"
        conn.rollback()
        conn.execute(QUERIES["contact_unsubscribe"], {"account": "default",
                                                      "email": "user2@example.com",
                                                      "source": "sql", "actor": "{}"})
        assert _setting(conn) == "on", "unsubscribe"
        conn.rollback()


def _setting(conn: Conn) -> str:
    row = conn.execute("SELECT current_setting('synchronous_commit') AS s").fetchone()
    assert row is not None
    return str(row["s"])


_ = threading  # threads come from test_dispatch.in_thread
