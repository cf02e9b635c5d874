"""Issue 11 §3: a handoff and an unsubscribe that were acknowledged survive a crash, even on
a server tuned with synchronous_commit = off (the functions and the contacts trigger pin it
on for their own transactions)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg

from pgcast.sql import embedded, migrate
from pgcast.sql.queries import QUERIES
from tests import support


def test_an_acknowledged_handoff_and_unsubscribe_survive_an_immediate_stop() -> None:
    base = Path(tempfile.mkdtemp(prefix="pgcast-durability-"))
    base.chmod(0o755)
    url = embedded.start(base)
    try:
        with psycopg.connect(url, autocommit=True) as c:
            migrate.migrate(c)
            # the common tuning: commits acknowledged before their WAL is flushed, and the
            # WAL writer flushing only every 10 s
            c.execute("ALTER SYSTEM SET synchronous_commit = off")
            c.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
            c.execute("SELECT pg_reload_conf()")
        with support.connect(url) as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone() == {
                "synchronous_commit": "off"}
            support.seed_contacts(conn, 3)
            bid = support.new_broadcast(conn)
            epoch = support.progress(conn, bid)["epoch"]
            token = uuid.uuid4()
            rows = conn.execute(QUERIES["claim"], {"id": bid, "limit": 2, "token": token,
                                                   "worker": "w", "lease": 60.0,
                                                   "after": 0}).fetchall()
            ids = [r["contact_id"] for r in rows]
            handed = conn.execute(QUERIES["handoff"], {"id": bid, "epoch": epoch,
                                                       "token": token, "ids": ids,
                                                       "contact": True}).fetchall()
            assert len(handed) == 2  # acknowledged: the worker would call the provider now
            unsubscribed = conn.execute(QUERIES["contact_unsubscribe"], {
                "account": "default", "email": "user2@example.com", "source": "api",
                "actor": "{}"}).fetchone()
            assert unsubscribed is not None  # acknowledged: the API would answer 200
        embedded.stop(base, mode="immediate")  # a crash: nothing more is flushed
        # a new process, as a person would: pgserver caches servers per process
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from sql import embedded; embedded.start(Path(sys.argv[1]))",
                        str(base)], cwd=support.ROOT, check=True, timeout=60)
        with support.connect(url) as conn:
            # the handed-off rows are still sending: claimed again and re-sent, they
            # would mail those people twice
            assert support.status_counts(conn, bid) == {"sending": 2, "pending": 1}
            row = conn.execute("SELECT unsubscribed_at FROM contacts "
                               "WHERE email = 'user2@example.com'").fetchone()
            assert row is not None and row["unsubscribed_at"] is not None
    finally:
        embedded.discard(base)
