"""PGCAST_RETENTION_DAYS: a worker archives old finished broadcasts by itself."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests import support
from tests.integration import test_retention as r

pytestmark = pytest.mark.acceptance
Conn = psycopg.Connection[dict[str, Any]]


def test_a_worker_archives_what_is_older_than_the_retention_days(
        db_url: str, conn: Conn, procs: support.Processes) -> None:
    support.seed_contacts(conn, 10)
    old, recent = r.sent_broadcast(conn), r.sent_broadcast(conn)
    r.age(conn, old, 3)
    r.age(conn, recent, 1)
    worker = procs.start(db_url, "worker", PGCAST_PROVIDER="null", PGCAST_RETENTION_DAYS="2")
    # a starting worker runs the latest period it missed: at once
    support.wait_for(lambda: not r.partition_attached(conn, old), timeout=60,
                     what="the old broadcast archived")
    archived = conn.execute("SELECT count(*) AS n FROM broadcast_recipients_archive "
                            "WHERE broadcast_id = %s", (old,)).fetchone()
    assert archived == {"n": 10}
    assert r.partition_attached(conn, recent)
    assert procs.stop(worker) == 0
    assert "Traceback" not in procs.log(worker), procs.log(worker)


def test_a_bad_retention_setting_stops_the_worker_at_start(db_url: str) -> None:
    done = support.pgcast(db_url, "worker", "--once", check=False, env=support.pgcast_env(
        db_url, PGCAST_PROVIDER="null", PGCAST_RETENTION_DAYS="-1"))
    assert done.returncode == 2 and "PGCAST_RETENTION_DAYS" in done.stderr
