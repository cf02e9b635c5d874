"""The floor: two processes drain N pending rows with a bare SKIP LOCKED claim and one UPDATE."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
import uuid
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from bench import common

BATCH = 500  # rows per claim, as pgcast's default --batch-size
PROCESSES = 2

# pgcast's row shape in a plain queue table: a key, an index of the pending rows in claim
# order (what a bare SKIP LOCKED queue claims through), and the in-flight and problem
# indexes a real queue keeps for leases and lookups. The floor pays what Postgres itself
# must pay for such rows and nothing more. (This is the shape broadcast_recipients had
# before 0003, kept so floors from different runs compare.)
CREATE = """
CREATE TABLE floor_queue (LIKE broadcast_recipients INCLUDING DEFAULTS,
                          CHECK (status IN ('pending', 'claimed', 'sending', 'sent', 'failed',
                                            'skipped', 'unknown', 'cancelled')),
                          PRIMARY KEY (broadcast_id, contact_id)) WITH (fillfactor = 80);
CREATE INDEX ON floor_queue (contact_id) WHERE status = 'pending';
CREATE INDEX ON floor_queue (broadcast_id, status, contact_id)
    WHERE status IN ('failed', 'unknown', 'skipped');
CREATE INDEX ON floor_queue (broadcast_id, contact_id) WHERE status IN ('claimed', 'sending')
"""
FILL = """
INSERT INTO floor_queue (broadcast_id, contact_id, email)
SELECT %(bid)s, g, 'user' || g || '@example.com' FROM generate_series(1, %(n)s) g
"""
CLAIM = """
WITH picked AS (
    SELECT contact_id FROM floor_queue
    WHERE broadcast_id = %(bid)s AND status = 'pending'
    ORDER BY contact_id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE floor_queue q
SET status = 'claimed', claim_token = %(token)s, lease_expires_at = clock_timestamp() + '30 s'
FROM picked
WHERE q.broadcast_id = %(bid)s AND q.contact_id = picked.contact_id
RETURNING q.contact_id
"""
DONE = """
UPDATE floor_queue
SET status = 'sent', attempts = attempts + 1, sent_at = now(), lease_expires_at = NULL
WHERE broadcast_id = %(bid)s AND contact_id = ANY (%(ids)s)
"""


def _drain(url: str, bid: uuid.UUID, ready: Event, go: Event, out: Any) -> None:
    """One draining process: claim, mark sent, until a claim comes back empty."""
    import psycopg

    done = 0
    with psycopg.connect(url, autocommit=True) as conn:
        ready.set()
        go.wait()
        while True:
            token = uuid.uuid4()
            ids = [r[0] for r in conn.execute(CLAIM, {"bid": bid, "limit": BATCH,
                                                      "token": token}).fetchall()]
            if not ids:
                break
            conn.execute(DONE, {"bid": bid, "ids": ids})
            done += len(ids)
    out.put(done)


def run(url: str, rows: int, *, analyze: bool = True) -> list[common.Figure]:
    """Fill floor_queue with `rows` pending rows in `url` and time two processes draining it."""
    bid = uuid.uuid4()
    with common.connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS floor_queue")
        conn.execute(CREATE)
        conn.execute(FILL, {"bid": bid, "n": rows})
        if analyze:
            conn.execute("VACUUM ANALYZE floor_queue")
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    out = ctx.Queue()
    readies = [ctx.Event() for _ in range(PROCESSES)]
    procs = [ctx.Process(target=_drain, args=(url, bid, r, go, out)) for r in readies]
    for p in procs:
        p.start()
    try:
        for r in readies:
            r.wait(60)
        t0 = time.perf_counter()
        go.set()
        drained = sum(out.get(timeout=3600) for _ in procs)
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    with common.connect(url) as conn:
        row = conn.execute("SELECT count(*) AS n FROM floor_queue WHERE status = 'sent'").fetchone()
        conn.execute("DROP TABLE floor_queue")
    assert row is not None and row["n"] == rows == drained, (row, rows, drained)
    state = "analyzed" if analyze else "never analyzed"
    return [common.Figure(
        "floor", "Floor: bare SKIP LOCKED drain, 2 processes", rows / elapsed, "rows/s",
        command=common.command("floor", "--rows", str(rows)),
        note=f"{rows:,} rows ({state} table) in {elapsed:.1f}s, claim {BATCH} + one UPDATE")]


def main(argv: list[str] | None = None) -> None:
    """Run the floor probe alone on its own database."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--no-analyze", action="store_true",
                   help="drain the table right after the fill, without VACUUM ANALYZE")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    with common.bench_db("floor") as url:
        figures = run(url, args.rows, analyze=not args.no_analyze)
    common.report(figures, common.command("floor", "--rows", str(args.rows)))
    if args.json:
        common.dump(figures, args.json)


if __name__ == "__main__":
    main()
