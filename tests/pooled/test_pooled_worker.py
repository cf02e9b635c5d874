"""A worker with no direct connection at all: it polls, and its sweeper works through PgBouncer."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from pgcast.sql import db
from pgcast.sql.queries import QUERIES
from tests import support

pytestmark = pytest.mark.acceptance
Conn = psycopg.Connection[dict[str, Any]]


def test_a_pooler_is_told_from_a_direct_connection(
        db_url: str, pgbouncer: support.PgBouncer, monkeypatch: pytest.MonkeyPatch) -> None:
    pooled = pgbouncer.url(db_url)
    assert not db.behind_pooler(db_url)
    assert db.behind_pooler(pooled)
    monkeypatch.delenv("PGCAST_LISTEN_URL", raising=False)
    assert db.listen_url(db_url) == db_url
    assert db.listen_url(pooled) is None  # poll
    monkeypatch.setenv("PGCAST_LISTEN_URL", db_url)
    assert db.listen_url(pooled) == db_url


def test_sweeper_through_pgbouncer_returns_an_expired_claim(
        db_url: str, conn: Conn, procs: support.Processes, pgbouncer: support.PgBouncer) -> None:
    support.seed_contacts(conn, 50)
    bid = support.new_broadcast(conn)
    # a worker that died holding every row: its lease ran out at once
    claimed = conn.execute(QUERIES["claim"], {"id": bid, "limit": 50, "token": uuid.uuid4(),
                                              "worker": "gone:1", "lease": 0.001,
                                              "after": 0}).fetchall()
    assert len(claimed) == 50
    worker = procs.start(pgbouncer.url(db_url), "worker", "--sweep-every", "1",
                         PGCAST_PROVIDER="null", PGCAST_LOG_LEVEL="INFO")
    # only the sweeper puts the rows back where the dispatch loops can claim them
    p = support.wait_for(lambda: (p := support.progress(conn, bid))["status"] == "sent" and p,
                         timeout=60, every=0.2, what="the broadcast sent")
    assert p["sent"] == 50
    support.assert_counters_true(conn, bid)
    assert procs.stop(worker) == 0
    log = procs.log(worker)
    assert "polling every" in log and "Traceback" not in log, log


def test_migrate_and_retention_through_pgbouncer(
        pg_server: str, pgbouncer: support.PgBouncer) -> None:
    from tests.integration import test_retention as r

    with support.fresh_database(pg_server, "template0") as direct:
        pooled = pgbouncer.url(direct)
        assert "procrastinate" in support.pgcast(pooled, "migrate").stdout
        assert support.pgcast(pooled, "migrate").stdout.strip() == "up to date"
        with support.connect(direct) as conn:
            support.seed_contacts(conn, 10)
            bid = r.sent_broadcast(conn)
            r.age(conn, bid, 2)
        # DETACH ... CONCURRENTLY is one statement of its own: a transaction pooler passes it
        out = support.pgcast(pooled, "retention", "--older-than", "1d")
        assert '"broadcasts": 1' in out.stdout
        with support.connect(direct) as conn:
            assert not r.partition_attached(conn, bid)
            assert conn.execute("SELECT count(*) AS n FROM broadcast_recipients_archive"
                                ).fetchone() == {"n": 10}
