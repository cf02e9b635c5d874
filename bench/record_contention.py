"""Records of one broadcast from several sessions at once: pgcast_record_v6 against v7 (issue 32).

v6 locks the broadcast row first and holds it through its whole group's UPDATE until commit,
so concurrent records of one broadcast take turns; v7 writes a group's final answers first
and holds the broadcast row only for the counters. This measures that alone, without the
workers' Python: per round, one broadcast of N recipients is sent and claimed and handed off
in groups of 500 by this process (pgcast_claim_handoff_v6, every row handed off), then
`--sessions` processes record all the groups (every row `sent`, with its message id, through
the worker's own parameters), as fast as they can, with one version or the other; rounds
alternate v6 and v7 so that load on a shared machine falls on both alike. Prints rows
recorded per second for each round, the median of each version, their ratio, and the share
of the recording sessions' samples (pg_stat_activity, every 20 ms) spent waiting for a lock.

    .venv/bin/python -m bench.record_contention --recipients 100000 --sessions 4 --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import threading
import time
import uuid
from typing import Any

from bench import common

GROUP = 500
CLAIM = "SELECT * FROM pgcast_claim_handoff_v6(%s, %s, %s, 'bench', '300 s', %s, false)"
RECORD = ("SELECT * FROM pgcast_record_{v}(%(id)s, %(token)s, %(ids)s::bigint[], "
          "%(outcomes)s::text[], %(message_ids)s::text[], %(errors)s::text[], "
          "%(retry_in)s::double precision[], %(breaker)s)")


def _record(url: str, version: str, bid: uuid.UUID, groups: list[tuple[uuid.UUID, list[int]]],
            ready: Any, go: Any, out: Any) -> None:
    """One recording session: every group given, one record each, autocommit."""
    import psycopg

    from pgcast.worker import dispatch

    params = [dispatch.record_params(bid, token, [
        dispatch.Outcome(cid, "sent", f"null-1-{cid}") for cid in ids], 0)
        for token, ids in groups]
    statement = RECORD.format(v=version)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_backend_pid()")
        ready.put(os.getpid())
        go.wait()
        n = 0
        for p in params:
            row = conn.execute(statement, p).fetchone()
            n += row[0] if row else 0
    out.put(n)


class Waits:
    """Samples the recording sessions' wait events while they run."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples = 0
        self.locked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with common.connect(self.url) as conn:
            while not self._stop.is_set():
                for r in conn.execute(
                        "SELECT wait_event_type FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND state = 'active' AND query LIKE %s",
                        ("SELECT * FROM pgcast_record_%",)).fetchall():
                    self.samples += 1
                    self.locked += r["wait_event_type"] == "Lock"
                time.sleep(0.02)

    def __enter__(self) -> Waits:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def one_round(url: str, version: str, sessions: int) -> tuple[float, float]:
    """Send, claim and hand off a broadcast; record it from `sessions` processes: (rows/s,
    share of the sessions' samples waiting for a lock)."""
    with common.connect(url) as conn:
        bid = common.new_draft(conn)
        common.send(conn, bid)
        conn.execute("ANALYZE broadcast_recipients")
        groups: list[tuple[uuid.UUID, list[int]]] = []
        after = 0
        while True:
            token = uuid.uuid4()
            rows = conn.execute(CLAIM, (bid, GROUP, token, after)).fetchall()
            if not rows:
                break
            after = rows[0]["last_fresh"]
            groups.append((token, [r["contact_id"] for r in rows]))
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_record, args=(url, version, bid, groups[i::sessions],
                                               ready, go, out))
             for i in range(sessions)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        with Waits(url) as waits:
            t0 = time.perf_counter()
            go.set()
            recorded = sum(out.get(timeout=1800) for _ in procs)
            elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    rows_total = sum(len(ids) for _, ids in groups)
    with common.connect(url) as conn:
        row = conn.execute("SELECT sent FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert recorded == rows_total and row is not None and row["sent"] == rows_total, (
        recorded, rows_total, row)
    return rows_total / elapsed, waits.locked / max(waits.samples, 1)


def main(argv: list[str] | None = None) -> None:
    """Alternate v6 and v7 rounds on one database; print each round and the medians."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipients", type=int, default=100_000)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="rounds of each version")
    args = p.parse_args(argv)
    print(f"cpus {os.cpu_count()}, load average at start "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    rates: dict[str, list[float]] = {"v6": [], "v7": []}
    with common.bench_db("record_contention") as url:
        common.seed_contacts(url, args.recipients)
        for i in range(args.rounds):
            for version in ("v6", "v7") if i % 2 == 0 else ("v7", "v6"):
                rate, locked = one_round(url, version, args.sessions)
                rates[version].append(rate)
                print(f"  round {i + 1} {version}: {rate:9,.0f} rows/s, "
                      f"{100 * locked:5.1f} % of the sessions' samples waiting for a lock",
                      flush=True)
    m6, m7 = statistics.median(rates["v6"]), statistics.median(rates["v7"])
    print(f"{args.sessions} sessions recording groups of {GROUP} of one broadcast of "
          f"{args.recipients:,}: median v6 {m6:,.0f} rows/s, v7 {m7:,.0f} rows/s, "
          f"v7 / v6 {m7 / m6:.2f}")
    print("load average at end " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("reproduce: " + common.command("record_contention", "--recipients",
                                         str(args.recipients), "--sessions",
                                         str(args.sessions), "--rounds", str(args.rounds)))


if __name__ == "__main__":
    main()
