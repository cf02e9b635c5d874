"""Takes per second on one bucket from 4 sessions (issue 24, item 8): pgcast_take_tokens_v3 as
it is (its own transaction commits asynchronously) against the same call with the commit
forced synchronous (v2's behaviour: the rate lock held through the WAL flush). Paired rounds,
back to back; the estimator is the median of the per-round ratios.

    python -m bench.take_commit
"""

from __future__ import annotations

import statistics
import threading
import time

import psycopg

from bench import common

SESSIONS = 4
SECONDS = 3.0  # per measurement
ROUNDS = 5


def takes_per_second(url: str, synchronous: bool) -> float:
    """Takes of one token each from SESSIONS sessions for SECONDS."""
    stop = time.monotonic() + SECONDS
    counts = [0] * SESSIONS

    def work(i: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while time.monotonic() < stop:
                with conn.transaction():
                    conn.execute("SELECT * FROM pgcast_take_tokens_v3('global', 1, NULL)")
                    if synchronous:
                        conn.execute("SET LOCAL synchronous_commit = on")
                counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / SECONDS


def main() -> int:
    """Run the paired rounds and print them."""
    with common.bench_db("takes") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE rate_limits SET rate = 1e9, burst = 1e9, tokens = 1e9 "
                         "WHERE name = 'global'")
            fsync = conn.execute("SHOW fsync").fetchone()
        print(f"{SESSIONS} sessions, one bucket, fsync {fsync[0] if fsync else '?'}")
        ratios, syncs, asyncs = [], [], []
        for r in range(ROUNDS):
            s = takes_per_second(url, True)
            a = takes_per_second(url, False)
            syncs.append(s)
            asyncs.append(a)
            ratios.append(a / s)
            print(f"round {r}: synchronous {s:.0f}/s, asynchronous {a:.0f}/s, ratio {a / s:.2f}")
        print(f"median of the ratios {statistics.median(ratios):.2f}; ratio of the medians "
              f"{statistics.median(asyncs) / statistics.median(syncs):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
