"""The global token bucket (invariant 8): pgcast_take_tokens_v1 on a real Postgres."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
import pytest

from pgcast.sql.queries import QUERIES
from tests import support

Conn = psycopg.Connection[dict[str, Any]]

# One hammering process: takes tokens as fast as it can for `seconds`, and records every
# grant with the bucket's refill time, read in the same transaction (so still under the
# advisory lock: the recorded time is the exact clock_timestamp() the refill used).
HAMMER = r"""
import random, sys, time
import psycopg
from sql.queries import QUERIES
url, name, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
bids = sys.argv[5].split(",") if len(sys.argv) > 5 else [None]  # takers: fair share (v2)
rng = random.Random(seed)
deadline = time.monotonic() + seconds
with psycopg.connect(url) as conn:
    while time.monotonic() < deadline:
        want = rng.randint(1, 7)
        with conn.transaction():
            if name.startswith("broadcast:"):  # a broadcast's own bucket (pgcast_take_own_v1)
                row = conn.execute(QUERIES["take_own_tokens"],
                                   {"name": name, "want": want}).fetchone()
            else:
                row = conn.execute(QUERIES["take_tokens"],
                                   {"name": name, "want": want,
                                    "broadcast": rng.choice(bids), "lead": 0}).fetchone()
            granted = row[0]
            if granted:
                conn.execute("INSERT INTO test_grants (bucket, granted, at) "
                             "SELECT name, %s, refilled_at FROM rate_limits WHERE name = %s",
                             (granted, name))
"""

PROCESSES = 4
SECONDS = 3.0  # each process hammers for this long


def take(conn: Conn, want: int, name: str = "global") -> tuple[int, float]:
    row = conn.execute(QUERIES["take_tokens"],
                       {"name": name, "want": want, "broadcast": None,
                        "lead": 0}).fetchone()
    assert row is not None
    return int(row["granted"]), float(row["wait_seconds"])


def set_rate(conn: Conn, rate: float, burst: float, name: str = "global") -> None:
    conn.execute(QUERIES["rate_set"], {"name": name, "rate": rate, "burst": burst})


def largest_excess(grants: list[tuple[float, int]], rate: float) -> float:
    """max over every interval [t_i, t_j] of (tokens granted in it) - rate * (t_j - t_i)."""
    best = float("-inf")
    before = 0.0  # tokens granted before grant i
    best_start = float("-inf")  # max over i <= j of (rate * t_i - tokens before i)
    for at, granted in sorted(grants):
        best_start = max(best_start, rate * at - before)
        before += granted
        best = max(best, before - rate * at + best_start)
    return best


def hammer(db_url: str, name: str, seconds: float,
           bids: list[str] | None = None) -> list[tuple[float, int]]:
    """PROCESSES OS processes taking tokens at once (for these broadcasts: their fair shares);
    every grant (seconds, tokens)."""
    with support.connect(db_url) as c:
        c.execute("CREATE TABLE IF NOT EXISTS test_grants "
                  "(bucket text, granted integer, at timestamptz)")
    extra = [",".join(bids)] if bids else []
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, db_url, name, str(seconds), str(i),
                               *extra],
                              cwd=support.ROOT, env=support.pgcast_env(db_url),
                              stderr=subprocess.PIPE, text=True)
             for i in range(PROCESSES)]
    for p in procs:
        _, err = p.communicate(timeout=seconds + 60)
        assert p.returncode == 0, err
    with support.connect(db_url) as c:
        # seconds since the first grant: exact microseconds, no float epoch rounding
        rows = c.execute("SELECT extract(epoch FROM at - min(at) OVER ())::float8 AS at, granted "
                         "FROM test_grants WHERE bucket = %s", (name,)).fetchall()
    return [(float(r["at"]), int(r["granted"])) for r in rows]


@pytest.mark.parametrize(("rate", "burst"), [(50.0, 5.0), (400.0, 40.0)])
def test_concurrent_processes_never_get_more_than_rate_times_elapsed_plus_burst(
        db_url: str, conn: Conn, rate: float, burst: float) -> None:
    set_rate(conn, rate, burst)
    grants = hammer(db_url, "global", SECONDS)
    total = sum(g for _, g in grants)
    # the bucket starts with at most `burst` tokens, so any interval, including the
    # first one, holds at most burst + rate * its length
    excess = largest_excess(grants, rate)
    assert excess <= burst + 1e-3, (excess, total, len(grants))
    assert total > burst, (excess, total)  # it refilled: not just the initial bucket


@pytest.mark.parametrize(("rate", "burst"), [(50.0, 5.0), (400.0, 40.0)])
def test_a_broadcasts_own_bucket_taken_in_batches_keeps_the_bound(
        db_url: str, conn: Conn, rate: float, burst: float) -> None:
    """pgcast_take_own_v1 (0034) from four processes: no grant below half the burst unless
    the ask is smaller, and still never more than rate x elapsed + burst."""
    set_rate(conn, rate, burst, name="broadcast:own")
    grants = hammer(db_url, "broadcast:own", SECONDS)
    total = sum(g for _, g in grants)
    assert largest_excess(grants, rate) <= burst + 1e-3
    assert total > burst


def test_fair_shares_keep_the_bound(db_url: str, conn: Conn) -> None:
    """Takers of three broadcasts in two accounts (fair share, pgcast_take_tokens_v2): the
    grants still never exceed rate x elapsed + burst, and the bucket is used."""
    rate, burst = 200.0, 10.0
    for account in ("a", "b"):
        support.seed_contacts(conn, 3, account=account)
    bids = [str(support.new_broadcast(conn, account=a)) for a in ("a", "a", "b")]
    set_rate(conn, rate, burst)
    grants = hammer(db_url, "global", SECONDS, bids)
    total = sum(g for _, g in grants)
    assert largest_excess(grants, rate) <= burst + 1e-3
    assert total > burst


def test_largest_excess_sees_an_overdraft() -> None:
    assert largest_excess([(0.0, 7)], rate=10) == 7
    assert largest_excess([(0.0, 5), (0.5, 5), (1.0, 5)], rate=10) == 5
    assert largest_excess([(0.0, 5), (0.1, 5)], rate=10) == pytest.approx(9)


def test_refill_is_rate_times_elapsed_capped_at_burst(conn: Conn) -> None:
    set_rate(conn, 10, 5)
    assert take(conn, 100)[0] <= 5
    granted, wait = take(conn, 1)
    assert granted == 0 and 0 < wait <= 0.1  # the next token is due within 1/rate s
    # pretend 0.35 s passed: 3.5 tokens accrued, 3 whole ones granted, half a token kept
    conn.execute("UPDATE rate_limits SET tokens = 0, "
                 "refilled_at = clock_timestamp() - interval '350 milliseconds' "
                 "WHERE name = 'global'")
    assert take(conn, 100)[0] == 3
    # pretend an hour passed: never more than the burst
    conn.execute("UPDATE rate_limits SET refilled_at = clock_timestamp() - interval '1 hour' "
                 "WHERE name = 'global'")
    assert take(conn, 100)[0] == 5
    assert take(conn, 100)[0] == 0


def test_unlimited_grants_everything_at_once(conn: Conn) -> None:
    set_rate(conn, 0, 1)
    for want in (1, 50, 10_000):
        assert take(conn, want) == (want, 0.0)


def test_an_unknown_bucket_is_unlimited(conn: Conn) -> None:
    assert take(conn, 500, name="broadcast:nobody") == (500, 0.0)


def test_rate_set_takes_effect_at_the_next_take(conn: Conn) -> None:
    set_rate(conn, 1, 1)
    take(conn, 10)
    assert take(conn, 10)[0] == 0
    set_rate(conn, 0, 1)
    assert take(conn, 10) == (10, 0.0)
    set_rate(conn, 2, 3)
    conn.execute("UPDATE rate_limits SET refilled_at = clock_timestamp() - interval '10 seconds' "
                 "WHERE name = 'global'")
    assert take(conn, 10)[0] == 3  # capped by the new burst


def test_a_dba_update_takes_effect_and_notifies_the_workers(db_url: str, conn: Conn) -> None:
    set_rate(conn, 1, 1)
    take(conn, 10)
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN pgcast_control")
        # a DBA's plain UPDATE, no pgcast involved
        conn.execute("UPDATE rate_limits SET rate = 1000, burst = 20 WHERE name = 'global'")
        notes = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert notes and '"bucket" : "global"' in notes[0] and '"rate" : 1000' in notes[0]
    conn.execute("UPDATE rate_limits SET refilled_at = clock_timestamp() - interval '1 second' "
                 "WHERE name = 'global'")
    assert take(conn, 100)[0] == 20
    conn.execute("UPDATE rate_limits SET rate = 0 WHERE name = 'global'")
    assert take(conn, 100) == (100, 0.0)


def test_drain_empties_the_bucket_for_that_long(conn: Conn) -> None:
    set_rate(conn, 100, 10)
    conn.execute(QUERIES["drain_tokens"], {"name": "global", "seconds": 1.0})
    granted, wait = take(conn, 1)
    assert granted == 0 and 0.9 < wait <= 1.01


def test_throttles_at_the_same_moment_do_not_stack(conn: Conn) -> None:
    set_rate(conn, 100, 10)
    for _ in range(4):  # four workers hit by the same SES throttle
        conn.execute(QUERIES["drain_tokens"], {"name": "global", "seconds": 1.0})
    granted, wait = take(conn, 1)
    assert granted == 0 and wait <= 1.01
