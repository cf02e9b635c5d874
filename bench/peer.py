"""The peer: procrastinate, one job per recipient, a no-op task, 2 worker processes; jobs/s."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import procrastinate
import psycopg

from bench import common

QUEUE = "bench_peer"
WORKERS = 2
CONCURRENCY = 2  # jobs at once per worker process, as pgcast's --concurrency 2
DEFER_CHUNK = 5_000  # jobs per batch_defer call


def make_app(url: str) -> procrastinate.App:
    """A procrastinate app with the one no-op task."""
    # it warns that the app lives in __main__; the task has an explicit name, so it is fine
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="bench.noop", queue=QUEUE)
    def noop(recipient: int) -> None:
        """What a null provider would do with one recipient: nothing."""

    del noop
    return app


def _worker(url: str) -> None:
    """The worker process: run procrastinate's worker on the bench queue until SIGTERM."""
    logging.basicConfig(level=logging.WARNING)
    app = make_app(url)
    with app.open():
        app.run_worker(queues=[QUEUE], concurrency=CONCURRENCY, wait=True,
                       install_signal_handlers=True)


def _left(conn: psycopg.Connection[dict[str, Any]]) -> int:
    row = conn.execute("SELECT count(*) AS n FROM procrastinate_jobs "
                       "WHERE queue_name = %s AND status IN ('todo', 'doing')", (QUEUE,)).fetchone()
    return int(row["n"]) if row else 0


def run(url: str, jobs: int) -> list[common.Figure]:
    """Start 2 procrastinate workers, defer `jobs` no-op jobs, time them to done."""
    env = common.child_env(url)
    procs = [subprocess.Popen([sys.executable, "-m", "bench.peer", "--worker"],
                              cwd=common.ROOT, env=env, start_new_session=True)
             for _ in range(WORKERS)]
    try:
        with common.connect(url) as conn:
            deadline = time.monotonic() + 60
            while conn.execute(
                    "SELECT count(DISTINCT pid) AS n FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query ILIKE 'LISTEN%%'"
                    ).fetchone()["n"] < WORKERS:  # type: ignore[index]
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("procrastinate workers did not start")
                time.sleep(0.05)
            app = make_app(url)
            task = app.tasks["bench.noop"]
            with app.open():
                t0 = time.perf_counter()
                for start in range(0, jobs, DEFER_CHUNK):
                    batch: list[dict[str, Any]] = [
                        {"recipient": i} for i in range(start, min(jobs, start + DEFER_CHUNK))]
                    task.batch_defer(*batch)
                t_deferred = time.perf_counter()
            while _left(conn):
                time.sleep(0.1)
            t_done = time.perf_counter()
            row = conn.execute("SELECT count(*) AS n FROM procrastinate_jobs "
                               "WHERE queue_name = %s AND status = 'succeeded'",
                               (QUEUE,)).fetchone()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    assert row is not None and row["n"] == jobs, (row, jobs)
    elapsed = t_done - t0
    return [common.Figure(
        "peer", "Peer: procrastinate, one job per recipient, 2 workers", jobs / elapsed, "jobs/s",
        command=common.command("peer", "--jobs", str(jobs)),
        note=f"{jobs:,} no-op jobs in {elapsed:.1f}s from the first defer "
             f"(deferring took {t_deferred - t0:.1f}s; workers run meanwhile)")]


def main(argv: list[str] | None = None) -> None:
    """Run the peer benchmark alone on its own database."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.worker:
        _worker(os.environ["DATABASE_URL"])
        return
    with common.bench_db("peer") as url:
        figures = run(url, args.jobs)
    common.report(figures, common.command("peer", "--jobs", str(args.jobs)))
    if args.json:
        common.dump(figures, args.json)


if __name__ == "__main__":
    main()
