"""Fair share of the global bucket (0011, pgcast_take_tokens_v2) on a real Postgres.

The bucket is frozen (a rate of one token in 1,000 s) and refilled by hand between rounds, so
every test decides exactly what each taker could have had; takers ask in a fixed order, the
same one first every round, which first come, first served would hand everything.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from pgcast.sql.queries import QUERIES
from pgcast.worker import pg, ratelimit
from tests import support

Conn = psycopg.Connection[dict[str, Any]]

BURST = 10.0  # a taker may run burst / 2 = 5 tokens ahead of a waiting peer
WANT = 100  # every taker asks for more than it can get: it is always waiting


def freeze(conn: Conn, tokens: float, burst: float = BURST) -> None:
    """The global bucket with `tokens` now and (practically) no refill."""
    conn.execute("UPDATE rate_limits SET rate = 0.001, burst = %s, tokens = %s, "
                 "refilled_at = clock_timestamp() WHERE name = 'global'", (burst, tokens))


def take(conn: Conn, bid: uuid.UUID | None, want: int = WANT) -> int:
    row = conn.execute(QUERIES["take_tokens"],
                       {"name": "global", "want": want, "broadcast": bid,
                        "lead": 0}).fetchone()
    assert row is not None
    return int(row["granted"])


def broadcast(conn: Conn, account: str, priority: int = 1) -> uuid.UUID:
    """A sending broadcast of the account (to two contacts of its own)."""
    support.seed_contacts(conn, 2, account=account, domain=f"{uuid.uuid4().hex[:8]}.example")
    bid = support.new_broadcast(conn, account=account)
    conn.execute("UPDATE broadcasts SET priority = %s WHERE id = %s", (priority, bid))
    return bid


def stop_waiting(conn: Conn, bid: uuid.UUID) -> None:
    """As if the broadcast (and its account) had got all it asked for: not waiting."""
    conn.execute("UPDATE rate_broadcast_shares SET waiting_at = NULL WHERE broadcast_id = %s",
                 (bid,))
    conn.execute("UPDATE rate_account_shares s SET waiting_at = NULL FROM broadcasts b "
                 "WHERE b.id = %s AND s.account = b.account", (bid,))


def rounds(conn: Conn, order: list[uuid.UUID], n: int = 100,
           refill: float = 4) -> dict[uuid.UUID, int]:
    """n rounds: put `refill` tokens in the bucket, then each taker asks in `order`."""
    got = dict.fromkeys(order, 0)
    for _ in range(n):
        conn.execute("UPDATE rate_limits SET tokens = %s, refilled_at = clock_timestamp() "
                     "WHERE name = 'global'", (refill,))
        for bid in order:
            got[bid] += take(conn, bid)
    return got


def test_first_come_first_served_without_a_broadcast(conn: Conn) -> None:
    """The control: takers that name no broadcast get whatever is there, in order."""
    freeze(conn, 4)
    assert take(conn, None) == 4
    assert take(conn, None) == 0


def test_two_accounts_share_equally_whoever_asks_first(conn: Conn) -> None:
    freeze(conn, 0)
    a, b = broadcast(conn, "a"), broadcast(conn, "b")
    got = rounds(conn, [a, b])
    assert got[a] + got[b] == 400  # nothing lost: the total stays at what the bucket had
    assert abs(got[a] - got[b]) <= BURST / 2, got


def test_priority_three_gets_three_times_its_siblings_share(conn: Conn) -> None:
    freeze(conn, 0)
    low1, low2, high = broadcast(conn, "a"), broadcast(conn, "a"), broadcast(conn, "a", 3)
    got = rounds(conn, [low1, low2, high], n=150)
    assert sum(got.values()) == 600
    assert got[high] == pytest.approx(3 * got[low1], rel=0.1), got
    assert got[low1] == pytest.approx(got[low2], abs=BURST), got


def test_an_account_weight_of_three_gets_three_times_the_others(conn: Conn, db_url: str) -> None:
    freeze(conn, 0)
    x, y, w = broadcast(conn, "x"), broadcast(conn, "y"), broadcast(conn, "w")
    support.pgcast(db_url, "rate", "weight", "w", "3")
    got = rounds(conn, [x, y, w], n=150)
    assert got[w] == pytest.approx(3 * got[x], rel=0.1), got
    assert got[x] == pytest.approx(got[y], abs=BURST), got


def test_shares_are_across_accounts_first_then_within_one(conn: Conn) -> None:
    """Account a has two broadcasts, b one: b's gets half, a's a quarter each (not a third)."""
    freeze(conn, 0)
    a1, a2, b1 = broadcast(conn, "a"), broadcast(conn, "a"), broadcast(conn, "b")
    got = rounds(conn, [a1, a2, b1])
    assert got[b1] == pytest.approx(200, abs=BURST), got
    assert got[a1] == pytest.approx(100, abs=BURST) and got[a2] == pytest.approx(100, abs=BURST)


def test_a_priority_never_takes_another_accounts_share(conn: Conn) -> None:
    freeze(conn, 0)
    high, other = broadcast(conn, "a", 10), broadcast(conn, "b")
    got = rounds(conn, [high, other])
    assert abs(got[high] - got[other]) <= BURST / 2, got


def test_what_one_does_not_use_goes_to_the_others(conn: Conn) -> None:
    """A taker far ahead of a waiting peer still gets what the bucket would lose once it is
    nearly full, and all of it once the peer has stopped waiting (not asked lately)."""
    freeze(conn, 0)
    a, b = broadcast(conn, "a"), broadcast(conn, "b")
    rounds(conn, [a, b], n=3)
    stop_waiting(conn, b)
    freeze(conn, 0)
    assert rounds(conn, [a], n=20, refill=4)[a] == 80  # b stopped asking: a runs ahead
    conn.execute("UPDATE rate_limits SET tokens = 3 WHERE name = 'global'")
    conn.execute("UPDATE rate_broadcast_shares SET waiting_at = clock_timestamp() "
                 "WHERE broadcast_id = %s", (b,))
    conn.execute("UPDATE rate_account_shares SET waiting_at = clock_timestamp() "
                 "WHERE account = 'b'")
    assert take(conn, a) == 0  # b is waiting and behind: the tokens are kept for it
    freeze(conn, BURST)  # full: what is above half of it would be lost
    assert take(conn, a) == BURST / 2
    # b has not asked lately (1.5 s at most): it is not waiting any more, a gets everything
    conn.execute("UPDATE rate_broadcast_shares SET waiting_at = waiting_at - interval '2 seconds'")
    conn.execute("UPDATE rate_account_shares SET waiting_at = waiting_at - interval '2 seconds'")
    freeze(conn, 4)
    assert take(conn, a) == 4


def test_no_credit_is_banked_while_away(conn: Conn) -> None:
    """b was away while a took 400 tokens alone: back, b shares equally from then on; it does
    not get the next 400 to itself."""
    freeze(conn, 0)
    a, b = broadcast(conn, "a"), broadcast(conn, "b")
    rounds(conn, [a, b], n=2)
    stop_waiting(conn, b)
    assert rounds(conn, [a], n=100)[a] == 400
    got = rounds(conn, [b, a], n=50)
    assert abs(got[a] - got[b]) <= BURST, got


def test_a_broadcast_unknown_to_the_bucket_is_served_first_come(conn: Conn) -> None:
    freeze(conn, 4)
    assert take(conn, uuid.uuid4()) == 4


def test_max_broadcasts_order_is_furthest_below_fair_share(conn: Conn) -> None:
    """active_broadcasts: least granted per weight first (the account's, then the broadcast's
    within it); a broadcast that has taken nothing (no share row) before any that has."""
    freeze(conn, 0)
    a1, a2, b1 = broadcast(conn, "a"), broadcast(conn, "a"), broadcast(conn, "b")
    conn.execute("UPDATE rate_limits SET tokens = 6 WHERE name = 'global'")
    assert take(conn, a1, 6) == 6  # a far ahead; a1 ahead within a
    conn.execute("UPDATE rate_limits SET tokens = 2 WHERE name = 'global'")
    assert take(conn, b1, 2) == 2
    fresh = broadcast(conn, "c")  # has taken nothing yet
    order = [r["id"] for r in conn.execute(QUERIES["active_broadcasts"]).fetchall()]
    assert order == [fresh, b1, a2, a1]


def test_rate_shares_active_and_progress_show_each_share(conn: Conn) -> None:
    """The view and progress: rate x account weight share x priority share, capped by the
    broadcast's own rate limit; null for a broadcast that takes no tokens."""
    conn.execute(QUERIES["rate_set"], {"name": "global", "rate": 120, "burst": 6})
    conn.execute(QUERIES["rate_weight_set"], {"account": "b", "weight": 2})
    a1, a2, b1 = broadcast(conn, "a", 2), broadcast(conn, "a"), broadcast(conn, "b")
    idle = broadcast(conn, "c")
    for bid in (a1, a2, b1):
        take(conn, bid, 1)
    shares = {r["broadcast_id"]: r for r in conn.execute(QUERIES["rate_shares"],
                                                         {"name": "global"}).fetchall()}
    assert set(shares) == {a1, a2, b1}
    assert shares[b1]["share_per_second"] == pytest.approx(80)  # 120 x 2/3
    assert shares[a1]["share_per_second"] == pytest.approx(120 / 3 * 2 / 3)
    assert shares[a2]["share_per_second"] == pytest.approx(120 / 3 * 1 / 3)
    assert shares[b1]["account_weight"] == 2 and shares[a1]["priority"] == 2
    assert support.progress(conn, b1)["share_per_second"] == pytest.approx(80)
    assert support.progress(conn, idle)["share_per_second"] is None
    conn.execute("UPDATE broadcasts SET rate_limit = 5 WHERE id = %s", (b1,))
    assert support.progress(conn, b1)["share_per_second"] == pytest.approx(5)


def test_the_sweeper_forgets_takers_gone_a_minute(conn: Conn) -> None:
    """Pruned under each bucket's lock: the stale rows go, the live ones stay."""
    freeze(conn, 8)
    old, live = broadcast(conn, "old"), broadcast(conn, "live")
    take(conn, old, 1)
    take(conn, live, 1)
    conn.execute("UPDATE rate_broadcast_shares SET asked_at = asked_at - interval '2 minutes' "
                 "WHERE broadcast_id = %s", (old,))
    conn.execute("UPDATE rate_account_shares SET asked_at = asked_at - interval '2 minutes' "
                 "WHERE account = 'old'")
    assert conn.execute(QUERIES["rate_shares_prune"]).fetchone() == {"pruned": 2}
    left = conn.execute("SELECT broadcast_id FROM rate_broadcast_shares").fetchall()
    assert left == [{"broadcast_id": live}]
    accounts = conn.execute("SELECT account FROM rate_account_shares").fetchall()
    assert accounts == [{"account": "live"}]


def test_a_full_bucket_of_one_still_goes_to_a_taker_ahead(conn: Conn) -> None:
    """Work conservation with the smallest bucket: half of one token rounds down to nothing,
    so the taker ahead gets the one token a full bucket would lose."""
    freeze(conn, 0, burst=1)
    a, b = broadcast(conn, "a"), broadcast(conn, "b")
    conn.execute("UPDATE rate_limits SET tokens = 1 WHERE name = 'global'")
    assert take(conn, a) == 1  # a is ahead now
    assert take(conn, b) == 0  # b waits (empty)
    for _ in range(3):
        conn.execute("UPDATE rate_limits SET tokens = 1 WHERE name = 'global'")
        assert take(conn, a) == 1  # full: it would be lost


def test_a_capped_broadcast_gives_back_what_the_global_share_did_not_grant(
        db_url: str, conn: Conn) -> None:
    """Buckets.take on a real database: tokens its own bucket granted beyond what the global
    bucket then granted go back to its own bucket, so its cap is not under-used."""
    freeze(conn, 2)
    bid = broadcast(conn, "a")
    conn.execute("INSERT INTO rate_limits (name, rate, burst, tokens) "
                 "VALUES (%s, 0.001, 10, 10)", (f"broadcast:{bid}",))

    async def run() -> int:
        async with AsyncConnectionPool(db_url, kwargs={"autocommit": True}, open=False) as pool:
            await pool.open()
            db = pg.Db(pool, asyncio.Event(), 30.0)
            buckets = ratelimit.Buckets(db, {"global": 0.001}, asyncio.Event(),
                                        lambda b, e: False)

            async def acquire(n: int) -> int:
                return n

            return await buckets.take(bid, 1, 0.001, 8, acquire, lambda n: None)

    assert asyncio.run(run()) == 2  # the global bucket had two
    own = conn.execute("SELECT tokens FROM rate_limits WHERE name = %s",
                       (f"broadcast:{bid}",)).fetchone()
    assert own is not None and own["tokens"] == pytest.approx(8, abs=0.01)  # 10 - 8 + 6
