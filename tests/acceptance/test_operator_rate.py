"""The operator's rate survives worker restarts (issue 24, item 10): real worker processes."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from tests import support
from tests.acceptance.test_provider_faults import WAIT, listening, rate_of, sent_count

Conn = psycopg.Connection[dict[str, Any]]
ENV = {"PGCAST_PROVIDER": "null", "PGCAST_RATE": "12"}


def start(procs: support.Processes, db_url: str, conn: Conn, *flags: str, **env: str) -> Any:
    """One worker, waited for until it is past start-up (its rate applied or kept)."""
    before = listening(conn)
    proc = procs.start(db_url, "worker", "--concurrency", "1", *flags, **{**ENV, **env})
    support.wait_for(lambda: listening(conn) == before + 1, timeout=WAIT, what="the worker")
    assert proc.poll() is None
    return proc


def test_restarting_a_worker_keeps_the_rate_the_operator_set(
        db_url: str, conn: Conn, procs: support.Processes) -> None:
    # nobody set the bucket: PGCAST_RATE starts it, and a later start may change it
    first = start(procs, db_url, conn)
    assert rate_of(conn) == (12.0, 2.0)
    procs.stop(first)
    first = start(procs, db_url, conn, PGCAST_RATE="20")
    assert rate_of(conn) == (20.0, 2.0)
    # the operator lowers it (an SES warning, say)
    support.pgcast(db_url, "rate", "set", "3")
    shown = json.loads(support.pgcast(db_url, "rate", "show").stdout)
    assert (shown["rate"], shown["operator_set_at"] is not None) == (3.0, True)
    # systemd restarts a worker, and another one starts: the operator's rate stays
    procs.stop(first)
    start(procs, db_url, conn, PGCAST_RATE="20")
    start(procs, db_url, conn, PGCAST_RATE="12", PGCAST_BURST="6")
    assert rate_of(conn) == (3.0, 2.0)
    # until the operator changes it again, by the CLI or by SQL
    conn.execute("UPDATE rate_limits SET rate = 7 WHERE name = 'global'")
    start(procs, db_url, conn, PGCAST_RATE="20")
    assert rate_of(conn) == (7.0, 2.0)


def test_a_rate_set_while_an_unlimited_claim_waits_applies_to_its_rows(
        db_url: str, conn: Conn, procs: support.Processes) -> None:
    """Issue 24, item 8: a worker under rate 0 claims and hands off a whole batch in one
    statement. That statement waits (here on the pause fence, held by the test) while the
    operator sets 1/s; before 0013 the batch then went out at once, without a token."""
    support.seed_contacts(conn, 30)
    bid = support.new_broadcast(conn, send=False)
    # one group is the whole claim, and no limit: the one-statement claim-and-handoff path
    start(procs, db_url, conn, "--group-size", "500", PGCAST_RATE="0")
    with psycopg.connect(db_url, autocommit=True) as fence:
        fence.execute("SELECT pg_advisory_lock(hashtext('pgcast.handoff'), hashtext(%s))",
                      (str(bid),))
        support.pgcast(db_url, "broadcast", "send", str(bid))
        support.wait_for(lambda: conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%%pgcast_claim_handoff_v%%' "
            "AND wait_event_type = 'Lock' AND datname = current_database()").fetchone(),
            timeout=WAIT, what="the worker's claim to wait on the fence")
        support.pgcast(db_url, "rate", "set", "1", "--burst", "1")
        conn.execute("UPDATE rate_limits SET tokens = 0, refilled_at = clock_timestamp() "
                     "WHERE name = 'global'")
        fence.execute("SELECT pg_advisory_unlock(hashtext('pgcast.handoff'), hashtext(%s))",
                      (str(bid),))
    support.wait_for(lambda: sent_count(conn, bid) >= 3, timeout=WAIT, what="three sends")
    # at 1/s with a burst of 1, no second holds more than 2 grants (3 with the jitter of
    # sent_at, stamped when the answer is recorded); the whole claim at once was 30
    row = conn.execute("SELECT max(n) AS n FROM (SELECT count(*) OVER (ORDER BY sent_at "
                       "RANGE BETWEEN CURRENT ROW AND interval '1 second' FOLLOWING) AS n "
                       "FROM broadcast_recipients WHERE broadcast_id = %s AND sent_at IS NOT NULL"
                       ") w", (bid,)).fetchone()
    assert row is not None and row["n"] <= 3, row
