"""The global wire schedule (0025, issue 26) on a real Postgres: every take that grants tokens
books as many wire slots, one every 1 / rate, in one schedule shared by every session, process
and kind of taker (broadcasts, messages, software outside pgcast)."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from pgcast.sql.queries import QUERIES
from tests import support

Conn = psycopg.Connection[dict[str, Any]]

PROCESSES = 4
SECONDS = 3.0

# One process taking tokens as fast as it can, through the three ways in at random, each
# grant's answer recorded in the take's own transaction (so in the order of the rate lock).
HAMMER = r"""
import random, sys, time
import psycopg
from sql.queries import QUERIES
url, seconds, seed, bid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
deadline = time.monotonic() + seconds
with psycopg.connect(url) as conn:
    while time.monotonic() < deadline:
        want, way = rng.randint(1, 7), rng.choice(["broadcast", "message", "external"])
        with conn.transaction():
            if way == "broadcast":
                row = conn.execute(QUERIES["take_tokens"], {
                    "name": "global", "want": want, "broadcast": bid,
                    "lead": rng.choice([0, 0.01, 0.05])}).fetchone()
                granted, offset, spacing, at = row[0], row[3], row[4], row[5]
            elif way == "message":
                row = conn.execute(QUERIES["message_take_tokens"], {
                    "name": "global", "want": want, "lead": rng.choice([0, 0.02])}).fetchone()
                granted, offset, spacing, at = row[0], row[2], row[3], row[4]
            else:
                row = conn.execute("SELECT * FROM pgcast_take_tokens_external_v2(%s)",
                                   (want,)).fetchone()
                granted, offset, spacing, at = row[0], row[2], row[3], None
                if granted:
                    at = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0]
            if granted:
                conn.execute("INSERT INTO test_slots (pid, way, granted, first, spacing, "
                             "taken_at) VALUES (%s, %s, %s, %s, %s, %s)",
                             (seed, way, granted, float(at) + offset if way != "external"
                              else None, spacing, at))
                if way == "external":  # its slots: from the schedule's row, read under the lock
                    conn.execute("UPDATE test_slots SET first = extract(epoch FROM next_slot) "
                                 "- granted * spacing FROM rate_limits "
                                 "WHERE name = 'global' AND test_slots.id = lastval()")
"""


def set_rate(conn: Conn, rate: float, burst: float) -> None:
    conn.execute(QUERIES["rate_set"], {"name": "global", "rate": rate, "burst": burst})


def hammer(db_url: str, conn: Conn, bid: str) -> list[dict[str, Any]]:
    """PROCESSES processes taking at once; every grant (pid, way, granted, first, spacing)."""
    conn.execute("CREATE TABLE test_slots (id bigserial PRIMARY KEY, pid integer, way text, "
                 "granted integer, first float8, spacing float8, taken_at float8)")
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, db_url, str(SECONDS), str(i), bid],
                              cwd=support.ROOT, env=support.pgcast_env(db_url),
                              stderr=subprocess.PIPE, text=True)
             for i in range(PROCESSES)]
    for p in procs:
        _, err = p.communicate(timeout=SECONDS + 60)
        assert p.returncode == 0, err
    return conn.execute("SELECT * FROM test_slots ORDER BY first").fetchall()


def slot_times(grants: list[dict[str, Any]]) -> list[float]:
    return sorted(g["first"] + i * g["spacing"] for g in grants for i in range(g["granted"]))


def max_in_window(times: list[float], width: float) -> int:
    """The most of `times` (sorted) in any half-open window [t, t + width)."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def overlaps(grants: list[dict[str, Any]]) -> int:
    """How many grants' slot ranges [first, first + granted x spacing) start inside the one
    before (a microsecond of tolerance: timestamptz's resolution)."""
    ranges = sorted((g["first"], g["first"] + g["granted"] * g["spacing"]) for g in grants)
    return sum(1 for a, b in zip(ranges, ranges[1:], strict=False) if b[0] < a[1] - 1e-5)


def per_process_schedule(grants: list[dict[str, Any]], rate: float) -> list[dict[str, Any]]:
    """What the slots were before 0025: each process spaced its own calls at the full rate
    from the moment of its grant (worker.ratelimit.Pacer per process)."""
    out = []
    tat: dict[int, float] = {}
    for g in sorted(grants, key=lambda g: g["taken_at"]):
        first = max(g["taken_at"], tat.get(g["pid"], float("-inf")))
        tat[g["pid"]] = first + g["granted"] / rate
        out.append({**g, "first": first, "spacing": 1 / rate})
    return out


def test_slots_of_concurrent_processes_never_overlap_nor_exceed_rate_times_window(
        db_url: str, conn: Conn) -> None:
    rate, burst = 200.0, 10.0
    support.seed_contacts(conn, 3)
    bid = str(support.new_broadcast(conn))
    set_rate(conn, rate, burst)
    grants = hammer(db_url, conn, bid)
    assert {g["way"] for g in grants} == {"broadcast", "message", "external"}
    assert len({g["pid"] for g in grants}) == PROCESSES
    total = sum(g["granted"] for g in grants)
    assert total > rate * SECONDS / 2  # the bucket was used, not starved
    assert all(g["spacing"] == pytest.approx(1 / rate) for g in grants)
    assert overlaps(grants) == 0
    times = slot_times(grants)
    for width in (0.05, 0.2, 1.0):
        assert max_in_window(times, width) <= rate * width + 1, width
        assert max_in_window(times, width) <= rate * width + burst
    # the same grants, each process pacing its own calls (the defect): their slots overlap
    # and a window holds more, so the checks above can fail
    before = per_process_schedule(grants, rate)
    assert overlaps(before) > 0
    assert max(max_in_window(slot_times(before), w) - rate * w for w in (0.05, 0.2, 1.0)) > 1


def test_the_checks_see_an_overlap() -> None:
    two = [{"first": 0.0, "granted": 3, "spacing": 0.1}, {"first": 0.15, "granted": 2,
                                                          "spacing": 0.1}]
    assert overlaps(two) == 1
    # 0.1, 0.15, 0.2, 0.25 in [0.1, 0.3): four, where rate 10 allows 0.2 x 10 + 1 = 3
    assert max_in_window(slot_times(two), 0.2) == 4
    assert max_in_window([0.0, 0.25, 0.5, 0.75], 0.5) == 2  # half-open windows


def take(conn: Conn, want: int, lead: float = 0.0) -> dict[str, Any]:
    row = conn.execute(QUERIES["take_tokens"], {"name": "global", "want": want,
                                                "broadcast": None, "lead": lead}).fetchone()
    assert row is not None
    return dict(row)


def test_the_first_slot_is_the_lead_ahead_of_an_idle_schedule_then_follows_the_last(
        conn: Conn) -> None:
    set_rate(conn, 10, 5)
    a = take(conn, 2, lead=0.3)
    assert a["granted"] == 2 and a["slot_spacing"] == pytest.approx(0.1)
    assert a["slot_offset"] == pytest.approx(0.3, abs=1e-6)
    assert a["slot_slack"] == pytest.approx(0.4)  # (burst - 1) / rate
    b = take(conn, 2)  # no lead asked, but the schedule is booked to a's last slot + 0.1
    assert b["granted"] == 2
    assert b["taken_at"] + b["slot_offset"] == pytest.approx(a["taken_at"] + 0.5, abs=1e-5)
    # a lead beyond a second is held to one second
    conn.execute("UPDATE rate_limits SET next_slot = NULL, tokens = 5 WHERE name = 'global'")
    assert take(conn, 1, lead=60)["slot_offset"] == pytest.approx(1.0, abs=1e-6)


def test_nothing_granted_or_no_limit_books_no_slot(conn: Conn) -> None:
    set_rate(conn, 10, 1)
    assert take(conn, 1)["granted"] == 1
    empty = take(conn, 1)
    assert empty["granted"] == 0 and empty["slot_offset"] is None
    set_rate(conn, 0, 1)
    free = take(conn, 50)
    assert free["granted"] == 50 and free["slot_offset"] is None
    slot = conn.execute("SELECT next_slot FROM rate_limits WHERE name = 'global'").fetchone()
    assert slot is not None and slot["next_slot"] is None
    row = conn.execute(QUERIES["message_take_tokens"],
                       {"name": "global", "want": 5, "lead": 0.1}).fetchone()
    assert row is not None and row["granted"] == 5 and row["slot_offset"] is None


def test_a_rate_change_rescales_the_schedule_booked_ahead_at_once(conn: Conn) -> None:
    set_rate(conn, 10, 20)
    conn.execute("UPDATE rate_limits SET tokens = 20 WHERE name = 'global'")
    a = take(conn, 10)  # ten slots at 10/s: the schedule is booked a second ahead
    ahead = a["taken_at"] + a["slot_offset"] + 1.0
    set_rate(conn, 100, 20)  # ten slots at 100/s take 0.1 s
    b = take(conn, 1)
    assert b["slot_spacing"] == pytest.approx(0.01)
    first = b["taken_at"] + b["slot_offset"]
    assert first < ahead - 0.5
    assert first == pytest.approx(a["taken_at"] + a["slot_offset"] + 0.1, abs=0.05)
    set_rate(conn, 1, 20)  # slower: what is booked ahead (0.1 s at 100/s) takes 10 x longer
    row = conn.execute("SELECT extract(epoch FROM next_slot - clock_timestamp()) AS ahead "
                       "FROM rate_limits WHERE name = 'global'").fetchone()
    assert row is not None and row["ahead"] > 0.5
    set_rate(conn, 0, 20)  # unlimited: the schedule is forgotten
    row = conn.execute("SELECT next_slot FROM rate_limits WHERE name = 'global'").fetchone()
    assert row is not None and row["next_slot"] is None


def test_the_stable_external_function_answers_the_wait_for_its_first_slot(conn: Conn) -> None:
    set_rate(conn, 10, 5)
    first = take(conn, 3, lead=0.5)  # the schedule is booked to 0.8 s from now
    assert first["granted"] == 3
    row = conn.execute("SELECT * FROM pgcast_take_tokens_external(1)").fetchone()
    assert row is not None and row["granted"] == 1
    assert row["wait_seconds"] == pytest.approx(0.8, abs=0.05)
    conn.execute("UPDATE rate_limits SET next_slot = NULL, tokens = 0, "
                 "refilled_at = clock_timestamp() WHERE name = 'global'")
    none = conn.execute("SELECT * FROM pgcast_take_tokens_external(1)").fetchone()
    assert none is not None and none["granted"] == 0 and 0 < none["wait_seconds"] <= 0.1


def test_a_call_too_late_at_the_wire_is_never_sent_and_is_put_back() -> None:
    """ses paces at the wire (botocore's before-send): a call whose slot passed by more than
    its allowed lateness while it waited there (a stalled thread) is not written to the
    endpoint, and its outcome is `release` (pending again, no attempt counted); a call on
    time for its slot is sent."""
    import concurrent.futures
    import time

    from pgcast.worker import dispatch, ratelimit, render
    from tests.integration.test_headers import capturing_ses, content

    with capturing_ses() as (provider, bodies):
        pacer = ratelimit.Pacer(lambda: 100.0)
        provider.pace_with(pacer.wait)
        executor = concurrent.futures.ThreadPoolExecutor(2)
        try:
            sender = dispatch.Sender(provider, dispatch.Retries(), executor)
            message = render.render(content(), 7, "bob@example.com", "Bob")
            now = time.monotonic()
            late = ratelimit.Slot(at=now - 0.5, since=now - 0.6, late_max=60.0)
            assert sender.paced(message, {}, [], math.inf, late).outcome == "sent"  # within
            # on time when paced() checks it, too late by the time it reaches the wire: the
            # thread stalls 0.1 s on its way there
            now = time.monotonic()
            stalled = ratelimit.Slot(at=now - 0.5, since=now - 0.6, late_max=0.5 + 0.05)
            pacer_delay = pacer.delay
            pacer.delay = lambda: (time.sleep(0.1), pacer_delay())[1]  # type: ignore[method-assign]
            stalled_out = sender.paced(message, {}, [], math.inf, stalled)
            pacer.delay = pacer_delay  # type: ignore[method-assign]
            now = time.monotonic()
            on_time = ratelimit.Slot(at=now + 0.05, since=now, late_max=0.5)
            assert sender.paced(message, {}, [], math.inf, on_time).outcome == "sent"
            assert time.monotonic() >= now + 0.05  # it waited for its slot
        finally:
            executor.shutdown()
    assert stalled_out.outcome == "release" and "too late" in (stalled_out.error or "")
    assert stalled_out.seconds is not None  # it reached the provider, which never sent it
    assert len(bodies) == 2 and sender.too_late == 1
