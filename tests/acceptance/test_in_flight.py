"""Many provider calls in flight in one process (a slow provider, the default flags): a kill -9
leaves at most --max-in-flight rows `unknown`, a SIGTERM none, and a cancel stops new calls at
once. Against bench.sesd, a local SES-compatible endpoint with a 300 ms latency."""

from __future__ import annotations

import collections
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from bench import sesd
from pgcast.sql import broadcasts
from tests import support

Conn = psycopg.Connection[dict[str, Any]]
IN_FLIGHT = 40  # --max-in-flight of the workers here: the documented crash bound
LATENCY = 0.3  # seconds per SendEmail


@pytest.fixture
def endpoint() -> Iterator[sesd.Endpoint]:
    with sesd.running(LATENCY) as ep:
        yield ep


def env(endpoint: sesd.Endpoint) -> dict[str, str]:
    return {**endpoint.env(), "PGCAST_RATE": "0", "PGCAST_LEASE_SECONDS": "3",
            "PGCAST_SWEEP_SECONDS": "1"}


def start(procs: support.Processes, db_url: str, endpoint: sesd.Endpoint) -> Any:
    return procs.start(db_url, "worker", "--max-in-flight", str(IN_FLIGHT), **env(endpoint))


def many_in_flight(endpoint: sesd.Endpoint) -> None:
    support.wait_for(lambda: endpoint.in_flight >= IN_FLIGHT * 3 // 4, timeout=60,
                     what="many calls in flight")


def received(endpoint: sesd.Endpoint) -> collections.Counter[str]:
    return collections.Counter(r.to for r in endpoint.snapshot())


def test_kill_9_with_many_calls_in_flight_leaves_at_most_max_in_flight_unknown(
        conn: Conn, db_url: str, procs: support.Processes, endpoint: sesd.Endpoint) -> None:
    support.seed_contacts(conn, 1500)
    bid = support.new_broadcast(conn)
    victim = start(procs, db_url, endpoint)
    many_in_flight(endpoint)
    assert endpoint.most_in_flight <= IN_FLIGHT
    procs.stop(victim, signal.SIGKILL)
    start(procs, db_url, endpoint)
    support.wait_for(lambda: support.progress(conn, bid)["status"] in ("sent", "failed"),
                     timeout=180, what="the broadcast to finish")
    p = support.assert_counters_true(conn, bid)
    assert p["sent"] + p["unknown"] == 1500, p
    # the calls in flight at the kill, and nothing else; never more than the window
    assert 1 <= p["unknown"] <= IN_FLIGHT, p
    got = received(endpoint)
    assert max(got.values()) == 1  # nobody mailed twice
    rows = {r["email"]: r["status"] for r in conn.execute(
        "SELECT email, status FROM broadcast_recipients WHERE broadcast_id = %s",
        (bid,)).fetchall()}
    assert all(got[a] == 1 for a, s in rows.items() if s == "sent")
    assert endpoint.most_in_flight <= IN_FLIGHT


def test_sigterm_with_many_calls_in_flight_records_them_all(
        conn: Conn, db_url: str, procs: support.Processes, endpoint: sesd.Endpoint) -> None:
    support.seed_contacts(conn, 1000)
    bid = support.new_broadcast(conn)
    worker = start(procs, db_url, endpoint)
    many_in_flight(endpoint)
    assert procs.stop(worker) == 0
    counts = support.status_counts(conn, bid)
    # everything handed off was answered and recorded; the rest went back to pending
    assert set(counts) <= {"sent", "pending"} and counts["sent"] >= IN_FLIGHT // 2, counts
    assert sum(received(endpoint).values()) == counts["sent"]
    support.assert_counters_true(conn, bid)


def test_a_cancel_stops_new_calls_at_once_with_many_in_flight(
        conn: Conn, db_url: str, procs: support.Processes, endpoint: sesd.Endpoint) -> None:
    support.seed_contacts(conn, 1500)
    bid = support.new_broadcast(conn)
    start(procs, db_url, endpoint)
    many_in_flight(endpoint)
    result = broadcasts.cancel(conn, "default", bid)
    assert result["success"] is True
    committed = conn.execute("SELECT clock_timestamp() AS t").fetchone()
    assert committed is not None
    support.wait_for(lambda: not conn.execute(
        "SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s "
        "AND status IN ('claimed', 'sending') LIMIT 1", (bid,)).fetchone(),
        timeout=60, what="the calls in flight to be recorded")
    p = support.assert_counters_true(conn, bid)
    late = conn.execute("SELECT count(*) AS n FROM broadcast_recipients WHERE broadcast_id = %s "
                        "AND handed_at > %s", (bid, committed["t"])).fetchone()
    assert late is not None and late["n"] == 0
    handed = p["sent"] + p["failed"] + p["unknown"]
    assert handed == result["alreadyQueued"] and p["cancelled"] == 1500 - handed, (p, result)
    # the provider received exactly the calls handed off before the cancel
    got = received(endpoint)
    assert sum(got.values()) == p["sent"] == handed and max(got.values()) == 1
    assert uuid.UUID(str(p["broadcast_id"])) == bid


def test_two_processes_share_a_small_broadcast(conn: Conn, db_url: str,
                                               procs: support.Processes,
                                               endpoint: sesd.Endpoint) -> None:
    """Claims hold about a second of a process's sending (here 200/s over 4 loops: 50 rows),
    not 500 rows per loop: the second process finds work instead of idling."""
    support.seed_contacts(conn, 800)
    extra = {**env(endpoint), "PGCAST_RATE": "200"}
    for _ in range(2):
        procs.start(db_url, "worker", **extra)
    support.wait_for(lambda: conn.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE query = 'LISTEN pgcast_control' "
        "AND datname = current_database()").fetchone()["n"] >= 2,  # type: ignore[index]
        timeout=60, what="both workers listening")
    bid = support.new_broadcast(conn)
    support.wait_for(lambda: support.progress(conn, bid)["status"] == "sent", timeout=120,
                     what="the broadcast to finish")
    split = [r["n"] for r in conn.execute(
        "SELECT worker, count(*) AS n FROM broadcast_recipients WHERE broadcast_id = %s "
        "GROUP BY worker", (bid,)).fetchall()]
    assert len(split) == 2 and min(split) >= 800 // 5, split
    assert max(received(endpoint).values()) == 1
