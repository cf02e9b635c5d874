"""Rate-limit bench: 4 `pgcast worker` processes against one global bucket.

For each target rate it seeds rate x duration contacts, sends one broadcast, waits until it
is drained, and measures the achieved rate (from the recipients' sent_at) and the largest
number of calls in any 1-second window, versus rate + burst: where they arrive, at a local
SES endpoint (bench.sesd, in a process of its own that does nothing else: ses provider, real
boto3), and at the handoff. With `--provider null` the workers send nothing anywhere and only
the handoffs are measured.

    python -m bench.ratelimit                  # embedded Postgres in a temp dir
    DATABASE_URL=postgresql://... python -m bench.ratelimit   # a server you run
    python -m bench.ratelimit --case 12:60 --case 500:20 [--provider null] [--own]

--own puts the limit on the broadcast instead (its `rate_limit`, whose bucket holds a tenth of
a second, at least one; the global bucket unlimited), the cap a broadcast's own bucket
enforces (pgcast_take_own_v1). Every line also gives the emails per handoff.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import common
from pgcast.sql import broadcasts
from pgcast.worker import main as worker_main

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4  # processes
CASES = ((12.0, 60.0), (500.0, 20.0))  # (emails/s, seconds)
WINDOW = 1.0  # seconds
WORKER_NICE = 5  # the workers' niceness above the bench's and the endpoint's


@dataclass
class Result:
    """One case's figures."""

    rate: float
    burst: float
    sent: int
    span: float  # seconds from the first to the last sent_at
    achieved: float  # emails/s: sent / span
    steady: float  # emails/s without the initial full bucket: (sent - burst) / span
    max_window: int  # most answers recorded (sent_at) in any 1-second window
    # most handoffs in any 1-second window: the handoff follows the token grant at once and
    # the provider call follows the handoff's commit, so this is the rate the provider sees;
    # sent_at is when the answer was recorded, bunched by the records' commits
    max_handed: int
    # most SendEmail requests in any 1-second window where they arrive (None: null provider)
    max_received: int | None = None
    handoffs: int = 0  # distinct handed_at: one per handoff statement
    own: bool = False  # the broadcast's own limit, not the global one

    def line(self) -> str:
        """One printable line."""
        error = (self.achieved - self.rate) / self.rate * 100
        busiest = self.max_handed if self.max_received is None else self.max_received
        verdict = "ok" if abs(error) <= 2 and busiest <= self.rate + self.burst else "MISS"
        at_endpoint = ("" if self.max_received is None else
                       f"max SendEmail at the endpoint in any {WINDOW:g}s window "
                       f"{self.max_received}; ")
        return (f"{'own' if self.own else 'global'} target {self.rate:g}/s burst "
                f"{self.burst:g}: {self.sent} sent in "
                f"{self.span:.2f}s -> achieved {self.achieved:.2f}/s ({error:+.2f}%), "
                f"steady {self.steady:.2f}/s; {at_endpoint}max handoffs in any {WINDOW:g}s "
                f"window {self.max_handed} (limit rate+burst = {self.rate + self.burst:g}; "
                f"by recorded sent_at {self.max_window}); "
                f"{self.sent / max(1, self.handoffs):.1f} emails per handoff"
                f" [{verdict}]")


def max_in_window(times: list[float], width: float) -> int:
    """The most timestamps in any half-open window [t, t + width)."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def run_case(url: str, rate: float, seconds: float, logs: Path, provider: str = "ses",
             own: bool = False) -> Result:
    """One target rate: seed, start the workers, send, wait until drained, measure."""
    from bench import messages  # its endpoint process (bench.messages imports this module)

    # a broadcast's own bucket: a tenth of a second of its rate, at least one (pgcast_send)
    burst = max(1.0, math.ceil(rate / 10)) if own else worker_main.default_burst(rate)
    n = int(rate * seconds)
    endpoint = messages.Endpoint(Path(tempfile.mkdtemp(prefix="pgcast-bench-rate-"))) \
        if provider == "ses" else None
    received: list[tuple[float, str]] = []
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("TRUNCATE contacts, broadcast_recipients, broadcasts CASCADE")
        conn.execute("INSERT INTO contacts (account, email) SELECT 'bench', "
                      "'r' || g || '@bench.example' FROM generate_series(1, %s) g", (n,))
        env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT),
               "PGCAST_PROVIDER": "null", "PGCAST_RATE": "0" if own else str(rate),
               "PGCAST_BURST": "1" if own else str(burst),
               "PGCAST_LOG_LEVEL": "WARNING", **(endpoint.env() if endpoint else {})}
        procs = [subprocess.Popen([sys.executable, "-m", "pgcast.bin.cli", "worker"],
                                  cwd=ROOT, env=env,
                                  stdout=(logs / f"worker-{rate:g}-{i}.log").open("w"),
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  # below the endpoint's priority: on a busy machine the
                                  # processes measured must not starve the one that measures
                                  # (its arrival stamps bunched after each stall)
                                  preexec_fn=lambda: os.nice(WORKER_NICE))
                 for i in range(WORKERS)]
        try:
            _wait(lambda: _listeners(conn) >= WORKERS, 60, "the workers to start")
            row = broadcasts.create(conn, "bench", subject="bench", from_address="b@bench.example",
                                    text="hello", rate_limit=rate if own else None)
            assert broadcasts.send(conn, "bench", row["id"])["success"]
            _wait(lambda: broadcasts.progress(conn, "bench", row["id"])["status"] == "sent",
                  seconds * 3 + 60, "the broadcast to drain")
            stamps = conn.execute(
                "SELECT extract(epoch FROM sent_at - min(sent_at) OVER ())::float8 AS t, "
                "extract(epoch FROM handed_at - min(handed_at) OVER ())::float8 AS h "
                "FROM broadcast_recipients WHERE broadcast_id = %s AND status = 'sent' "
                "ORDER BY sent_at", (row["id"],)).fetchall()
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                p.wait(timeout=60)
            if endpoint is not None:
                received = endpoint.stop()
    times = [float(r["t"]) for r in stamps]
    span = times[-1] - times[0]
    return Result(rate, burst, len(times), span, len(times) / span, (len(times) - burst) / span,
                  max_in_window(times, WINDOW),
                  max_in_window(sorted(float(r["h"]) for r in stamps), WINDOW),
                  max_in_window(sorted(at for at, _ in received), WINDOW)
                  if endpoint is not None else None,
                  len({float(r["h"]) for r in stamps}), own)


def _listeners(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE "
                       "query = 'LISTEN pgcast_control' AND datname = current_database()"
                       ).fetchone()
    return int(row["n"]) if row else 0


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def _case(raw: str) -> tuple[float, float]:
    rate, _, seconds = raw.partition(":")
    return float(rate), float(seconds or 20)


def main(argv: list[str] | None = None) -> int:
    """Run the cases and print one line each."""
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", type=_case, metavar="RATE:SECONDS",
                        help="a target rate and duration (default 12:60 and 500:20)")
    parser.add_argument("--provider", choices=("ses", "null"), default="ses",
                        help="ses: real boto3 to a local endpoint, measured where the calls "
                             "arrive (default); null: no calls, measured at the handoff")
    parser.add_argument("--own", action="store_true",
                        help="the limit on the broadcast (rate_limit), the global unlimited")
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="pgcast-bench-logs-"))
    what = ("ses provider -> local endpoint (its own process)" if args.provider == "ses"
            else "null provider")
    print(f"{WORKERS} worker processes x 4 dispatch loops, {what}, cpus {os.cpu_count()}; "
          f"worker logs in {logs}")
    with common.server() as server_url, common.database(server_url, "ratelimit") as url:
        for rate, seconds in args.case or CASES:
            print(run_case(url, rate, seconds, logs, args.provider, args.own).line(),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
