"""Progress read: p50/p99 of the progress query and of the broadcast_progress view."""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

from bench import common
from pgcast.sql.queries import QUERIES

VIEW = "SELECT * FROM broadcast_progress WHERE broadcast_id = %(id)s"
WARMUP = 50  # reads before timing: connection caches and prepared statements settle


def run(url: str, bid: uuid.UUID, recipients: int, samples: int) -> list[common.Figure]:
    """Time `samples` reads of each query of one broadcast of `recipients` recipients."""
    figures = []
    cmd = common.command("progress", "--recipients", str(recipients), "--samples", str(samples))
    queries = {"progress_query": ("QUERIES['broadcast_progress']", QUERIES["broadcast_progress"]),
               "progress_view": ("SELECT * FROM broadcast_progress", VIEW)}
    with common.connect(url) as conn:
        for key, (label, sql) in queries.items():
            params = {"id": bid, "account": common.ACCOUNT}
            times = []
            for i in range(WARMUP + samples):
                t0 = time.perf_counter()
                row = conn.execute(sql, params, prepare=True).fetchone()
                if i >= WARMUP:
                    times.append((time.perf_counter() - t0) * 1000)
                assert row is not None and row["total"] == recipients, row
            p99 = common.percentile(times, 99)
            figures.append(common.Figure(
                key, f"{label} p99 at {recipients:,} recipients", p99, "ms", aim="<= 5 ms",
                passed=p99 <= 5, command=cmd,
                note=f"p50 {common.percentile(times, 50):.3f} ms, max {max(times):.2f} ms, "
                     f"{samples:,} reads on one connection"))
    return figures


def main(argv: list[str] | None = None) -> None:
    """Snapshot a broadcast of N recipients (not drained) and time its progress reads."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipients", type=int, default=1_000_000)
    p.add_argument("--samples", type=int, default=5_000)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    with common.bench_db("progress") as url:
        common.seed_contacts(url, args.recipients)
        with common.connect(url) as conn:
            bid = common.new_draft(conn)
            common.send(conn, bid)
        figures = run(url, bid, args.recipients, args.samples)
    common.report(figures, common.command("progress", "--recipients", str(args.recipients),
                                          "--samples", str(args.samples)))
    if args.json:
        common.dump(figures, args.json)


if __name__ == "__main__":
    main()
