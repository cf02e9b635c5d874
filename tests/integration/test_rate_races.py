"""The rate path's races (issue 24, item 8), forced with real sessions."""

from __future__ import annotations

from typing import Any

import psycopg

from pgcast.sql.queries import QUERIES
from tests import support
from tests.integration import test_dispatch as d
from tests.integration.test_fences import waiting_or_done

Conn = psycopg.Connection[dict[str, Any]]
HOLD = 4242  # advisory lock key the test holds to stop the prune between its two DELETEs


def shares(conn: Conn) -> tuple[int, int]:
    row = conn.execute("SELECT (SELECT count(*) FROM rate_account_shares) AS a, "
                       "(SELECT count(*) FROM rate_broadcast_shares) AS b").fetchone()
    assert row is not None
    return int(row["a"]), int(row["b"])


def test_the_prune_never_forgets_an_account_and_keeps_its_broadcasts(db_url: str,
                                                                     conn: Conn) -> None:
    """v1 read the clock once per DELETE: an account and its broadcast last asked at the
    same time, a minute ago between the two reads, lost the account row and kept the
    broadcast's, whose virtual time then stood far ahead of a restarted account clock."""
    support.seed_contacts(conn, 1)
    bid = support.new_broadcast(conn)
    conn.execute(QUERIES["rate_set"], {"name": "global", "rate": 100, "burst": 5})
    conn.execute(QUERIES["take_tokens"], {"name": "global", "want": 1, "broadcast": bid,
                                             "lead": 0})
    # both last asked 57 s ago (one take stamps both): a minute old three seconds from now
    conn.execute("UPDATE rate_account_shares SET asked_at = clock_timestamp() "
                 "- interval '57 seconds'")
    conn.execute("UPDATE rate_broadcast_shares SET asked_at = "
                 "(SELECT asked_at FROM rate_account_shares)")
    assert shares(conn) == (1, 1)
    # the prune's DELETE of account rows waits for the test here, while the clock moves on
    conn.execute("CREATE FUNCTION test_hold() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                 f"PERFORM pg_advisory_lock({HOLD}); PERFORM pg_advisory_unlock({HOLD}); "
                 "RETURN NULL; END $$")
    conn.execute("CREATE TRIGGER test_hold BEFORE DELETE ON rate_account_shares "
                 "FOR EACH STATEMENT EXECUTE FUNCTION test_hold()")
    with psycopg.connect(db_url, autocommit=True) as holder, \
            psycopg.connect(db_url, autocommit=True) as pruner:
        holder.execute(f"SELECT pg_advisory_lock({HOLD})")  # type: ignore[arg-type]
        thread, out = d.in_thread(lambda: pruner.execute(QUERIES["rate_shares_prune"]).fetchone())
        support.wait_for(waiting_or_done(conn, pruner.info.backend_pid, out),
                         what="the prune to wait between its two DELETEs")
        assert "at" not in out
        support.wait_for(lambda: conn.execute(
            "SELECT asked_at < clock_timestamp() - interval '1 minute' AS old "
            "FROM rate_account_shares").fetchone() == {"old": True},
            what="the last ask to be a minute old")
        holder.execute(f"SELECT pg_advisory_unlock({HOLD})")  # type: ignore[arg-type]
        thread.join(30)
    assert "error" not in out
    # one cutoff: both kept (they were not a minute old when the prune looked), or both gone
    assert shares(conn) in ((1, 1), (0, 0))
