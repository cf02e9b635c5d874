"""What one sweep costs with many scheduled broadcasts in the table (issue 15).

The starts a sweep makes are O(due broadcasts) through the broadcasts_scheduled index: with
10,000 broadcasts scheduled for later, a sweep that finds nothing due should cost what it
costs with none. Times one empty start_due, a whole sweep (sweeper.sweep_conn: lease expiry
and finalize, one broadcast per transaction; then start_due), and one start of a due
broadcast, with and without the scheduled backlog.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench import common
from pgcast.sql.queries import QUERIES
from pgcast.worker import starter, sweeper

WARMUP = 20  # calls before timing
# the function's own lookup of due broadcasts, for EXPLAIN ANALYZE
DUE = ("SELECT d.id FROM broadcasts d WHERE d.status = 'scheduled' AND d.scheduled_at <= now() "
       "ORDER BY d.scheduled_at LIMIT 1 FOR UPDATE SKIP LOCKED")


def _backlog(conn: psycopg.Connection[Any], n: int) -> None:
    """n broadcasts scheduled over the next 30 days, none due."""
    conn.execute(
        "INSERT INTO broadcasts (account, subject, from_address, text_body, status, "
        "scheduled_at) SELECT %s, 'later ' || g, 'news@example.com', 'hi', 'scheduled', "
        "now() + make_interval(secs => 60 + g * 259.0) FROM generate_series(1, %s) g",
        (common.ACCOUNT, n))
    conn.execute("ANALYZE broadcasts")


def _time(call: Callable[[], Any], samples: int) -> list[float]:
    times = []
    for i in range(WARMUP + samples):
        t0 = time.perf_counter()
        call()
        if i >= WARMUP:
            times.append((time.perf_counter() - t0) * 1000)
    return times


def _starts(conn: psycopg.Connection[Any], due: int) -> float:
    """ms per start of `due` broadcasts due now (each snapshots the seeded contacts)."""
    for _ in range(due):
        bid = common.new_draft(conn)
        conn.execute("UPDATE broadcasts SET status = 'scheduled', scheduled_at = now() "
                     "WHERE id = %s", (bid,))
    t0 = time.perf_counter()
    started = starter.start_due(conn)
    elapsed = (time.perf_counter() - t0) * 1000
    assert len(started) == due and all(r["status"] == "sending" for r in started), started
    return elapsed / due


def measure(url: str, backlog: int, samples: int, due: int) -> dict[str, Any]:
    """The figures on one database with `backlog` broadcasts scheduled for later."""
    with common.connect(url) as conn:
        if backlog:
            _backlog(conn, backlog)
        empty = _time(lambda: conn.execute(QUERIES["start_due"]).fetchall(), samples)
        # the whole sweep a worker runs: leases and finalize per broadcast, then the starts
        sweep = _time(lambda: (sweeper.sweep_conn(conn), starter.start_due(conn)), samples)
        plan = [r["QUERY PLAN"] for r in conn.execute(
            f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {DUE}").fetchall()]  # type: ignore[arg-type]
        per_start = _starts(conn, due)
    return {"empty": empty, "sweep": sweep, "plan": plan, "per_start": per_start}


def run(backlog: int, samples: int, due: int, contacts: int) -> list[common.Figure]:
    """Both databases (no backlog, then the backlog), on one server."""
    cmd = common.command("schedule", "--backlog", str(backlog), "--samples", str(samples))
    results = {}
    with common.server() as srv:
        for n in (0, backlog):
            with common.database(srv, f"schedule{n}") as url:
                common.seed_contacts(url, contacts)
                results[n] = measure(url, n, samples, due)
    figures = []
    for key, label in (("empty", "start_due finding nothing due"),
                       ("sweep", "a whole sweep (sweeper.sweep_conn, then start_due)")):
        for n in (0, backlog):
            t = results[n][key]
            figures.append(common.Figure(
                f"schedule_{key}_{n}", f"{label}, {n:,} broadcasts scheduled later: p50",
                common.percentile(t, 50), "ms", command=cmd,
                note=f"p99 {common.percentile(t, 99):.3f} ms over {samples:,} calls"))
    ratio = (common.percentile(results[backlog]["empty"], 50)
             / common.percentile(results[0]["empty"], 50))
    figures.append(common.Figure(
        "schedule_ratio", f"start_due p50 with {backlog:,} scheduled / with none", ratio, "×",
        aim="<= 1.5× (O(due), not O(scheduled))", passed=ratio <= 1.5, command=cmd))
    figures.append(common.Figure(
        "schedule_start", f"one start of a due broadcast ({contacts:,} recipients) among "
        f"{backlog:,} scheduled", results[backlog]["per_start"], "ms", command=cmd,
        note=f"mean of {due} starts in one sweep; with none scheduled "
             f"{results[0]['per_start']:.1f} ms"))
    print(f"EXPLAIN ANALYZE of the due lookup with {backlog:,} scheduled:")
    for line in results[backlog]["plan"]:
        print(f"    {line}")
    return figures


def main(argv: list[str] | None = None) -> None:
    """Run and print the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backlog", type=int, default=10_000)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--due", type=int, default=10)
    p.add_argument("--contacts", type=int, default=1_000)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    figures = run(args.backlog, args.samples, args.due, args.contacts)
    common.report(figures, common.command("schedule", "--backlog", str(args.backlog),
                                          "--samples", str(args.samples)))
    if args.json:
        common.dump(figures, args.json)


if __name__ == "__main__":
    main()
