"""Cancel latency: from a cancel's commit to the last handoff, with 3 worker processes.

    python -m bench.cancel_latency [--cancels 25] [--recipients 20000] [--rate 5000]

Each round sends a broadcast, cancels it once sending is under way, and reads from the rows
(a) the last handoff (`handed_at`, the start of the handoff statement) relative to the cancel's
commit on the server clock, and (b) how long after the cancel returned the last in-flight group
was recorded (no row left `claimed` or `sending`).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import common
from pgcast.sql import broadcasts

ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def run(url: str, cancels: int, recipients: int, rate: float) -> dict[str, Any]:
    """Run the rounds against url; return the figures."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("INSERT INTO contacts (account, email) SELECT 'bench', 'c' || g || "
                     "'@example.com' FROM generate_series(1, %s) g", (recipients,))
        conn.execute("UPDATE rate_limits SET rate = %s, burst = %s WHERE name = 'global'",
                     (rate, max(1, rate / 20)))
        env = dict(os.environ, DATABASE_URL=url, PGCAST_PROVIDER="null",
                   PGCAST_LOG_LEVEL="WARNING")
        env.pop("PGCAST_RATE", None)
        args = ["worker", "--concurrency", "2", "--group-size", "50", "--batch-size", "500"]
        workers = [subprocess.Popen([sys.executable, "-m", "pgcast.bin.cli", *args],
                                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
                   for _ in range(3)]
        handoff_ms: list[float] = []
        quiet_ms: list[float] = []
        after: list[int] = []
        try:
            for _ in range(cancels):
                b = broadcasts.create(conn, "bench", subject="c", from_address="a@example.com",
                                      text="x")
                broadcasts.send(conn, "bench", b["id"])
                deadline = time.monotonic() + 60
                while broadcasts.progress(conn, "bench", b["id"])["sent"] < recipients // 10:
                    if time.monotonic() > deadline:
                        raise RuntimeError("workers are not sending")
                    time.sleep(0.01)
                broadcasts.cancel(conn, "bench", b["id"])
                returned = time.monotonic()
                row = conn.execute("SELECT clock_timestamp() AS t").fetchone()
                assert row is not None
                committed = row["t"]
                # worker IS NOT NULL: what lets this poll use the in-flight index
                while conn.execute("SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s "
                                   "AND worker IS NOT NULL AND status IN ('claimed', 'sending') "
                                   "LIMIT 1",
                                   (b["id"],)).fetchone():
                    time.sleep(0.005)
                quiet_ms.append((time.monotonic() - returned) * 1000)
                last = conn.execute(
                    "SELECT max(handed_at) AS h, "
                    "count(*) FILTER (WHERE handed_at > %s) AS late "
                    "FROM broadcast_recipients WHERE broadcast_id = %s",
                    (committed, b["id"])).fetchone()
                assert last is not None
                handoff_ms.append(max(0.0, (last["h"] - committed).total_seconds() * 1000))
                after.append(int(last["late"]))
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.wait(timeout=30)
    return {"cancels": cancels, "handoff_p50": pct(handoff_ms, 50),
            "handoff_p99": pct(handoff_ms, 99), "quiet_p50": pct(quiet_ms, 50),
            "quiet_p99": pct(quiet_ms, 99), "handoffs_after_cancel": sum(after),
            "quiet_mean": statistics.mean(quiet_ms)}


def main() -> int:
    """Parse flags, run on a fresh database (DATABASE_URL's server or an embedded one)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cancels", type=int, default=25)
    ap.add_argument("--recipients", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=5000.0, help="global rate, emails/s")
    args = ap.parse_args()
    with common.server() as server_url, common.database(server_url, "cancel") as url:
        r = run(url, args.cancels, args.recipients, args.rate)
    print(f"cancel latency over {r['cancels']} cancels, 3 workers x concurrency 2, "
          f"null provider at {args.rate:g}/s, {args.recipients} recipients each")
    print(f"  cancel commit -> last handoff:         p50 {r['handoff_p50']:.1f} ms   "
          f"p99 {r['handoff_p99']:.1f} ms   (handoffs begun after the commit: "
          f"{r['handoffs_after_cancel']})")
    print(f"  cancel returned -> nothing in flight:  p50 {r['quiet_p50']:.1f} ms   "
          f"p99 {r['quiet_p99']:.1f} ms   (polled every 5 ms)")
    print(f"  command: python -m bench.cancel_latency --cancels {args.cancels} "
          f"--recipients {args.recipients} --rate {args.rate:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
