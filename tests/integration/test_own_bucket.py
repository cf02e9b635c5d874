"""A broadcast's own limit is taken in batches of half its burst (0034, pgcast_take_own_v1) on a
real Postgres: the function itself, and two real worker processes draining a capped broadcast.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from pgcast.sql import broadcasts
from pgcast.sql.queries import QUERIES
from tests import support

Conn = psycopg.Connection[dict[str, Any]]


def own(conn: Conn, rate: float, burst: float, tokens: float) -> str:
    """A broadcast's own bucket holding `tokens` now."""
    name = f"broadcast:{uuid.uuid4()}"
    conn.execute("INSERT INTO rate_limits (name, rate, burst, tokens, refilled_at) "
                 "VALUES (%s, %s, %s, %s, clock_timestamp())", (name, rate, burst, tokens))
    return name


def take(conn: Conn, name: str, want: int) -> tuple[int, float]:
    row = conn.execute(QUERIES["take_own_tokens"], {"name": name, "want": want}).fetchone()
    assert row is not None
    return int(row["granted"]), float(row["wait_seconds"])


def test_nothing_is_granted_below_half_the_burst_and_the_wait_says_until_when(
        conn: Conn) -> None:
    name = own(conn, 0.001, 10, 4)  # frozen: a rate of one token in 1,000 s
    before = conn.execute("SELECT tokens, refilled_at, xmin::text AS x FROM rate_limits "
                          "WHERE name = %s", (name,)).fetchone()
    granted, wait = take(conn, name, 50)
    assert granted == 0
    assert wait == pytest.approx(1 / 0.001, rel=0.01)  # one more token: 5 of 10
    after = conn.execute("SELECT tokens, refilled_at, xmin::text AS x FROM rate_limits "
                         "WHERE name = %s", (name,)).fetchone()
    assert after == before  # an empty take writes nothing


def test_half_the_burst_is_granted_and_everything_there_up_to_what_was_asked(
        conn: Conn) -> None:
    name = own(conn, 0.001, 10, 5)
    assert take(conn, name, 50)[0] == 5
    assert take(conn, name, 50)[0] == 0
    conn.execute("UPDATE rate_limits SET tokens = 9 WHERE name = %s", (name,))
    assert take(conn, name, 7)[0] == 7  # all it asked for
    conn.execute("UPDATE rate_limits SET tokens = 9 WHERE name = %s", (name,))
    assert take(conn, name, 50)[0] == 9  # all there was


def test_a_small_ask_or_a_small_burst_waits_for_no_more_than_it_can_use(conn: Conn) -> None:
    name = own(conn, 0.001, 10, 2)
    assert take(conn, name, 2)[0] == 2  # the last two rows of a broadcast: no wait for five
    one = own(conn, 0.001, 1, 1)  # 5/s: burst 1, half of it rounds to nothing, so one
    assert take(conn, one, 50)[0] == 1


def test_asking_for_nothing_takes_and_writes_nothing(conn: Conn) -> None:
    name = own(conn, 100, 10, 10)
    before = conn.execute("SELECT tokens, xmin::text AS x FROM rate_limits WHERE name = %s",
                          (name,)).fetchone()
    assert take(conn, name, 0) == (0, 0.0)
    assert take(conn, name, -3) == (0, 0.0)
    assert conn.execute("SELECT tokens, xmin::text AS x FROM rate_limits WHERE name = %s",
                        (name,)).fetchone() == before


def test_an_unknown_or_unlimited_bucket_grants_everything(conn: Conn) -> None:
    assert take(conn, "broadcast:nobody", 40) == (40, 0.0)
    name = own(conn, 0, 10, 0)
    assert take(conn, name, 40) == (40, 0.0)


def test_two_worker_processes_send_a_capped_broadcast_in_batches_at_its_rate(
        db_url: str, conn: Conn, procs: support.Processes) -> None:
    """Two real workers draining a broadcast capped at 100/s (burst 10): each handoff carries
    about half a burst, not the token or two that came due since the other process's take,
    and the cap holds (burst + rate x elapsed at most)."""
    n = 300
    support.seed_contacts(conn, n)
    bid = support.new_broadcast(conn, send=False)
    conn.execute("UPDATE broadcasts SET rate_limit = 100 WHERE id = %s", (bid,))
    assert broadcasts.send(conn, "default", bid)["success"]
    for _ in range(2):
        procs.start(db_url, "worker", PGCAST_PROVIDER="null", PGCAST_RATE="0")
    support.wait_for(lambda: support.progress(conn, bid)["status"] == "sent", timeout=60,
                     what="the broadcast to be sent")
    handoffs = conn.execute(
        "SELECT extract(epoch FROM handed_at - min(handed_at) OVER ())::float AS at, "
        "count(*) AS n FROM broadcast_recipients WHERE broadcast_id = %s AND status = 'sent' "
        "GROUP BY handed_at ORDER BY handed_at", (bid,)).fetchall()
    assert sum(h["n"] for h in handoffs) == n
    # half the burst (5) a take, less only for a claim's last rows; a token or two a take
    # came to 1.3-1.5 rows a handoff
    assert n / len(handoffs) >= 4, len(handoffs)
    # the cap between any two handoffs: the burst, plus 100/s for the time between them, plus
    # slack: handed_at is when a handoff statement started, some time after its grant (a
    # starved process's), so the first of two can look later than its tokens were
    for i, first in enumerate(handoffs):
        carried = 0
        for later in handoffs[i:]:
            carried += later["n"]
            assert carried <= 10 + 100 * (later["at"] - first["at"]) + 20, (first, later)
