"""The operator's rate survives worker restarts (issue 24, item 10): real worker processes."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from tests import support
from tests.acceptance.test_provider_faults import WAIT, listening, rate_of

Conn = psycopg.Connection[dict[str, Any]]
ENV = {"PGCAST_PROVIDER": "null", "PGCAST_RATE": "12"}


def start(procs: support.Processes, db_url: str, conn: Conn, **env: str) -> Any:
    """One worker, waited for until it is past start-up (its rate applied or kept)."""
    before = listening(conn)
    proc = procs.start(db_url, "worker", "--concurrency", "1", **{**ENV, **env})
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
