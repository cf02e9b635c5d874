"""Provider-latency bench: `pgcast worker` processes against a local SES-compatible endpoint.

The endpoint (bench.sesd) answers each SendEmail after a fixed latency and timestamps every
request it receives: rates are measured there, where the provider sees them, not from
sent_at. Each case seeds its recipients, starts the workers (default flags unless told), waits
until they LISTEN, sends one broadcast and waits until it is drained.

    python -m bench.provider                       # every case below, embedded Postgres
    python -m bench.provider --case 100:200:1      # latency ms : global rate (0 = none) : procs
    python -m bench.provider --case 100:200:1:6000:0.05@10000   # ... : recipients : a tail
                                                   # (5 % of calls answered after 10,000 ms)
    python -m bench.provider --tails               # the latency-tail cases (issue 25)
    python -m bench.provider --split               # only the null-provider 2-process split

Figures per case: the steady rate over the middle 80% of deliveries, its ratio to the limit,
the most requests received in any 1-second window (against rate + burst), duplicates, the
most requests the endpoint had in flight, and each worker's CPU seconds per delivered message.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import psycopg
from psycopg.rows import dict_row

from bench import common, ratelimit, sesd
from pgcast.sql import broadcasts
from pgcast.worker import main as worker_main

ROOT = Path(__file__).resolve().parent.parent
# (latency ms, global rate /s, processes, recipients): the bars, then the reports
CASES = ((20, 200, 1, 3000), (100, 200, 1, 3000), (300, 200, 1, 3000), (100, 400, 2, 5000),
         (100, 0, 1, 6000))
# (latency ms, rate, processes, recipients, slow share, slow ms): a tail must not stall a
# process (issue 25): >= 0.9 of the limit with 5 % at 10 s, >= 0.97 with 1 % at 5 s
TAILS = ((100, 200, 1, 6000, 0.05, 10000.0), (100, 200, 1, 6000, 0.01, 5000.0),
         (100, 200, 1, 6000, 0.0, 0.0))
SPLIT_RECIPIENTS = 2000
WINDOW = 1.0  # seconds
SAMPLE = 0.05  # seconds between samples of the endpoint's requests in flight


@dataclass
class Result:
    """One case's figures, from the endpoint's timestamps."""

    latency_ms: float
    rate: float  # the global limit (0 = none)
    burst: float
    procs: int
    received: int
    duplicates: int
    steady: float  # requests/s over the middle 80% of deliveries
    max_window: int  # most requests received in any 1-second window
    max_handed: int  # most rows handed off (tokens spent) in any 1-second window
    most_in_flight: int
    mean_in_flight: float  # requests the endpoint was answering, sampled while sending
    cpu_ms: float  # worker CPU milliseconds per delivered message (all processes)
    split: list[int]
    tail: str = ""  # "5% at 10000 ms", or empty

    def line(self) -> str:
        """One printable line."""
        limit = f"limit {self.rate:g}/s" if self.rate else "no limit"
        ratio = f" = {self.steady / self.rate:.3f} x limit" if self.rate else ""
        cap = (f" (rate + burst = {self.rate + self.burst:g})" if self.rate else "")
        tail = f" ({self.tail})" if self.tail else ""
        return (f"{self.latency_ms:g} ms{tail}, {limit}, {self.procs} process(es): "
                f"{self.received} received, {self.duplicates} duplicates, steady "
                f"{self.steady:.1f}/s{ratio}; most in any {WINDOW:g}s {self.max_window} received, "
                f"{self.max_handed} handed off{cap}; "
                f"endpoint in flight at most {self.most_in_flight}, mean "
                f"{self.mean_in_flight:.1f}; CPU "
                f"{self.cpu_ms:.2f} ms/message; split {self.split}")


def steady_rate(times: list[float]) -> float:
    """Requests per second between the 10th and the 90th percentile of arrival times."""
    n = len(times)
    lo, hi = int(n * 0.1), int(n * 0.9) - 1
    span = times[hi] - times[lo]
    return (hi - lo) / span if span > 0 else float("nan")


def _seed(conn: psycopg.Connection[Any], n: int) -> None:
    conn.execute("TRUNCATE contacts, broadcast_recipients, broadcasts, rate_limits CASCADE")
    conn.execute("INSERT INTO contacts (account, email) SELECT 'bench', "
                 "'r' || g || '@bench.example' FROM generate_series(1, %s) g", (n,))


def _start(url: str, env: dict[str, str], n: int, logs: Path, label: str,
           args: list[str]) -> list[subprocess.Popen[str]]:
    full = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT),
            "PGCAST_LOG_LEVEL": "WARNING", **env}
    procs = []
    for i in range(n):
        with (logs / f"worker-{label}-{i}.log").open("w") as log:  # the child keeps its copy
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pgcast.bin.cli", "worker", *args], cwd=ROOT, env=full,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True))
    return procs


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        p.wait(timeout=60)


def _cpu(procs: list[subprocess.Popen[str]]) -> float:
    total = 0.0
    for p in procs:
        t = psutil.Process(p.pid).cpu_times()
        total += t.user + t.system
    return total


@contextlib.contextmanager
def _sampling(endpoint: sesd.Endpoint) -> Iterator[list[int]]:
    """The endpoint's requests in flight every SAMPLE seconds, from a thread, for the block."""
    samples: list[int] = []
    done = threading.Event()

    def run() -> None:
        while not done.wait(SAMPLE):
            samples.append(endpoint.in_flight)

    thread = threading.Thread(target=run, daemon=True, name="sampler")
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join(5)


def _steady_mean(samples: list[int]) -> float:
    """The mean of the middle 80% of the samples (start-up and drain left out)."""
    middle = samples[len(samples) // 10: len(samples) * 9 // 10] or samples
    return sum(middle) / len(middle) if middle else float("nan")


def _send_and_drain(conn: psycopg.Connection[Any], timeout: float) -> Any:
    row = broadcasts.create(conn, "bench", subject="bench", from_address="b@bench.example",
                            text="hello")
    assert broadcasts.send(conn, "bench", row["id"])["success"]
    ratelimit._wait(lambda: broadcasts.progress(conn, "bench", row["id"])["status"] == "sent",
                    timeout, "the broadcast to drain")
    return row["id"]


def _split(conn: psycopg.Connection[Any], bid: Any) -> list[int]:
    rows = conn.execute("SELECT worker, count(*) AS n FROM broadcast_recipients "
                        "WHERE broadcast_id = %s GROUP BY worker ORDER BY 2 DESC",
                        (bid,)).fetchall()
    return [int(r["n"]) for r in rows]


def run_case(url: str, latency_ms: float, rate: float, nprocs: int, n: int,
             logs: Path, args: list[str], slow_share: float = 0.0,
             slow_ms: float = 0.0) -> Result:
    """One case: endpoint, workers, one broadcast of n recipients, figures."""
    burst = worker_main.default_burst(rate) if rate else 0.0
    with sesd.running(latency_ms / 1000, slow_share=slow_share,
                      slow_latency=slow_ms / 1000) as endpoint, \
            psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        _seed(conn, n)
        env = {**endpoint.env(), "PGCAST_RATE": str(rate)}
        if rate:
            env["PGCAST_BURST"] = str(burst)
        procs = _start(url, env, nprocs, logs, f"{latency_ms:g}-{rate:g}", args)
        try:
            ratelimit._wait(lambda: ratelimit._listeners(conn) >= nprocs, 60,
                            "the workers to start")
            time.sleep(1.0)  # their imports and first polls are not the sending's CPU
            cpu0 = _cpu(procs)
            with _sampling(endpoint) as samples:
                bid = _send_and_drain(conn, n / max(rate, 50) * 4 + 60 + 3 * slow_ms / 1000)
            cpu = _cpu(procs) - cpu0
            split = _split(conn, bid)
            handed = [float(r["h"]) for r in conn.execute(
                "SELECT extract(epoch FROM handed_at)::float8 AS h FROM broadcast_recipients "
                "WHERE broadcast_id = %s AND handed_at IS NOT NULL ORDER BY 1", (bid,))]
        finally:
            _stop(procs)
        got = endpoint.snapshot()
    times = sorted(r.at for r in got)
    counts = Counter(r.to for r in got)
    return Result(latency_ms, rate, burst, nprocs, len(got),
                  sum(c - 1 for c in counts.values()), steady_rate(times),
                  ratelimit.max_in_window(times, WINDOW), ratelimit.max_in_window(handed, WINDOW),
                  endpoint.most_in_flight, _steady_mean(samples),
                  cpu / max(1, len(got)) * 1000, split,
                  f"{slow_share:.0%} at {slow_ms:g} ms" if slow_share else "")


def run_split(url: str, logs: Path) -> list[int]:
    """Two null-provider workers, idle and listening, then a 2,000-recipient broadcast."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        _seed(conn, SPLIT_RECIPIENTS)
        procs = _start(url, {"PGCAST_PROVIDER": "null", "PGCAST_RATE": "0"}, 2, logs, "split", [])
        try:
            ratelimit._wait(lambda: ratelimit._listeners(conn) >= 2, 60, "the workers to start")
            bid = _send_and_drain(conn, 120)
            return _split(conn, bid)
        finally:
            _stop(procs)


def boto3_cost(calls: int = 2000, threads: int = 16) -> tuple[float, float]:
    """boto3's own CPU per SendEmail (ms) and calls/s, one shared client on `threads` threads
    against the endpoint at 0 latency, in this process (the endpoint's thread included)."""
    import concurrent.futures
    import resource

    from pgcast.worker import render, ses

    with sesd.running(0.0) as endpoint:
        os.environ.update(endpoint.env())
        provider = ses.SesProvider.from_env(threads)
        content = render.Content.from_row({
            "id": "00000000-0000-0000-0000-000000000000", "account": "bench",
            "subject": "bench", "from_address": "b@bench.example", "text_body": "hello",
            "html_body": None})
        message = render.render(content, 1, "r1@bench.example", None)
        provider.send(message)  # the client's first call loads its models
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, t0 = usage.ru_utime + usage.ru_stime, time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: provider.send(message), range(calls)))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu, wall = usage.ru_utime + usage.ru_stime - cpu0, time.monotonic() - t0
    return cpu / calls * 1000, calls / wall


def _case(raw: str) -> tuple[float, float, int, int, float, float]:
    parts = raw.split(":")
    latency, rate = float(parts[0]), float(parts[1])
    nprocs = int(parts[2]) if len(parts) > 2 else 1
    n = int(parts[3]) if len(parts) > 3 else 3000
    share, slow = 0.0, 0.0
    if len(parts) > 4:
        share_raw, _, slow_raw = parts[4].partition("@")
        share, slow = float(share_raw), float(slow_raw)
    return latency, rate, nprocs, n, share, slow


def main(argv: list[str] | None = None) -> int:
    """Run the cases and print one line each."""
    parser = argparse.ArgumentParser(prog="python -m bench.provider", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", type=_case,
                        metavar="LATENCY_MS:RATE[:PROCS[:RECIPIENTS[:SHARE@SLOW_MS]]]")
    parser.add_argument("--tails", action="store_true", help="only the latency-tail cases")
    parser.add_argument("--split", action="store_true", help="only the null-provider split")
    parser.add_argument("--boto3", action="store_true",
                        help="only boto3's CPU per call (no database)")
    parser.add_argument("--worker-args", default="", help="extra `pgcast worker` flags")
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="pgcast-bench-provider-"))
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}; worker logs in {logs}",
          flush=True)
    extra = args.worker_args.split()
    if args.tails:
        args.case = list(TAILS)
    if args.boto3 or not (args.case or args.split):
        per_call, rate = boto3_cost()
        print(f"boto3 alone: {per_call:.2f} ms CPU per SendEmail (client and endpoint in one "
              f"process), {rate:.0f} calls/s on 16 threads at 0 ms latency", flush=True)
        if args.boto3:
            return 0
    # the endpoint timestamps requests in this process: a full collection here (boto3 above
    # left many objects) would hold its thread and bunch the timestamps of requests that
    # arrived evenly; what exists now lives to the end anyway
    gc.freeze()
    with common.server() as server_url, common.database(server_url, "provider") as url:
        if not args.split:
            cases = args.case or [(*c, 0.0, 0.0) for c in CASES]
            for latency, rate, nprocs, n, share, slow in cases:
                print(run_case(url, latency, rate, nprocs, n, logs, extra, share, slow).line(),
                      flush=True)
        if args.split or not args.case:
            print(f"null provider, 2 processes, {SPLIT_RECIPIENTS} recipients: rows per process "
                  f"{run_split(url, logs)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
