"""A claim's cost with many rows waiting for their retry time (issue 11 §3).

    python -m bench.claim_backoff [--recipients 200000] [--backoff 100000] [--rounds 200]

A broadcast of `recipients` rows; `backoff` of them were claimed, handed off and recorded
`retry` one hour ahead (status pending, retry_at in the future). Then `rounds` claims of 500
fresh rows each, every claim rolled back so the state stays the same, timed on the client;
and the same claims with no row in backoff (a second broadcast of the same size), in paired
rounds. Prints p50/p99 of each and the median of the per-round ratios.

Runs on the code it is started from: run it on two commits to compare them.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import common
from pgcast.sql.queries import QUERIES

BATCH = 500  # rows per claim, the worker's default


def prepare(url: str, recipients: int, backoff: int) -> tuple[uuid.UUID, uuid.UUID]:
    """Two broadcasts of `recipients` rows; `backoff` rows of the first wait for a retry."""
    common.seed_contacts(url, recipients)
    with common.connect(url) as conn:
        waiting, fresh = common.new_draft(conn), common.new_draft(conn)
        common.send(conn, waiting)
        common.send(conn, fresh)
        epoch = 1
        left = backoff
        after = 0
        while left > 0:
            n = min(5000, left)
            token = uuid.uuid4()
            rows = conn.execute(QUERIES["claim"], {"id": waiting, "limit": n, "token": token,
                                                   "worker": "bench", "lease": 600.0,
                                                   "after": after}).fetchall()
            ids = [r["contact_id"] for r in rows]
            after = max(ids)
            conn.execute(QUERIES["handoff"], {"id": waiting, "epoch": epoch, "token": token,
                                              "ids": ids, "contact": True})
            conn.execute(QUERIES["record"], {
                "id": waiting, "token": token, "ids": ids, "outcomes": ["retry"] * len(ids),
                "message_ids": [None] * len(ids), "errors": ["later"] * len(ids),
                "retry_in": [3600.0] * len(ids), "breaker": 0})
            left -= len(ids)
        conn.execute("VACUUM ANALYZE broadcast_recipients")
    return waiting, fresh


def one_claim(conn: psycopg.Connection[dict[str, Any]], bid: uuid.UUID, after: int) -> float:
    """Seconds for one claim of BATCH rows, rolled back."""
    t0 = time.perf_counter()
    with conn.transaction(force_rollback=True):
        rows = conn.execute(QUERIES["claim"], {"id": bid, "limit": BATCH, "token": uuid.uuid4(),
                                               "worker": "bench", "lease": 30.0,
                                               "after": after}).fetchall()
    elapsed = time.perf_counter() - t0
    assert len(rows) == BATCH, len(rows)
    return elapsed


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def main() -> None:
    """Run and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=200_000)
    parser.add_argument("--backoff", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with common.bench_db("backoff") as url:
        waiting, fresh = prepare(url, args.recipients, args.backoff)
        with psycopg.connect(url, row_factory=dict_row) as conn:
            with_backoff: list[float] = []
            without: list[float] = []
            for _ in range(args.rounds):  # paired rounds, back to back
                with_backoff.append(one_claim(conn, waiting, args.backoff))
                without.append(one_claim(conn, fresh, args.backoff))
    ratios = [a / b for a, b in zip(with_backoff, without, strict=True)]
    print(f"claim of {BATCH} rows, {args.recipients} recipients, {args.rounds} paired rounds")
    print(f"  with {args.backoff} rows in backoff: p50 {pct(with_backoff, 50) * 1000:.2f} ms, "
          f"p99 {pct(with_backoff, 99) * 1000:.2f} ms")
    print(f"  with none in backoff:            p50 {pct(without, 50) * 1000:.2f} ms, "
          f"p99 {pct(without, 99) * 1000:.2f} ms")
    of_medians = statistics.median(with_backoff) / statistics.median(without)
    print(f"  ratio (median of paired rounds): {statistics.median(ratios):.2f}x; "
          f"ratio of the medians {of_medians:.2f}x")


if __name__ == "__main__":
    main()
