"""Webhooks out (issue 30): deliveries/s from one worker process to a local receiver answering
in 20 ms, and what a dead endpoint with 100,000 queued events costs the mail drain.

1. throughput: 8 accounts x 4 endpoints (the defaults: 32 slots, 4 per account), events
   queued before the worker starts; deliveries/s = deliveries / (last - first delivered_at).
   An endpoint has one delivery in flight at a time (its order), so 500/s at 20 ms needs at
   least 10 endpoints in flight: 32 allow 1,600/s before any overhead. The receiver is a
   process of its own (asyncio, keep-alive), its CPU printed beside the worker's and the
   server's, so it is seen not to be the limit. --runs N repeats it on fresh databases;
   --py-spy FILE samples the worker (collapsed stacks, one file per run); --host localhost
   makes the endpoints' URLs name their host (resolved at every delivery, as a real one is).
2. dead endpoint: one worker drains a broadcast (null provider) while an endpoint whose
   receiver accepts connections and never answers (every attempt waits the 10 s timeout)
   holds 100,000 pending deliveries, vs the same drain with that endpoint disabled (and no
   attempt of it in flight). A ratio is the drain's rate with the dead endpoint over its rate
   without: 1.0 is no cost, 0.95 a 5 % cost. Paired rounds, back to back, order
   alternating; the ratio is the median of the pairs' ratios (decided before the run), with
   the ratio of the medians beside it.

    .venv/bin/python -m bench.webhooks [--deliveries N] [--recipients N] [--pairs N]
                                       [--backlog N] [--part all|throughput|dead]
                                       [--runs N] [--py-spy FILE] [--host NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from bench import common, profile_db

ACCOUNTS = 8
ENDPOINTS_PER_ACCOUNT = 4
LATENCY = 0.020  # seconds the receiver waits before answering
PY_SPY = os.path.join(os.path.dirname(sys.executable), "py-spy")  # the dev extra's
ENV = {"PGCAST_WEBHOOKS_ALLOW_HTTP": "1", "PGCAST_WEBHOOKS_ALLOW_PRIVATE": "1",
       "PGCAST_WEBHOOKS_POLL": "0.2"}


# -- the receivers (child processes: they never share the worker's or our CPU time slices) -


async def _serve(port: int, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                await asyncio.sleep(delay)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=512)
    async with server:
        await server.serve_forever()


def _silent(port: int) -> None:
    """Accept connections, never answer (a dead receiver whose host is up)."""
    sock = socket.create_server(("127.0.0.1", port), backlog=512)
    held = []
    while True:
        conn, _ = sock.accept()
        held.append(conn)


@contextlib.contextmanager
def receiver(mode: str) -> Iterator[int]:
    """A receiver child process on a free port: 'answer' (20 ms) or 'silent'."""
    with receiver_process(mode) as (port, _pid):
        yield port


@contextlib.contextmanager
def receiver_process(mode: str) -> Iterator[tuple[int, int]]:
    """A receiver child process on a free port, and its pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "bench.webhooks", "--serve", mode,
                             str(port)], cwd=common.ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the receiver did not start")
            time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.kill()
        proc.wait()


# -- 1. throughput ---------------------------------------------------------------------------


def endpoint(conn: Any, account: str, url: str) -> str:
    row = conn.execute("INSERT INTO webhook_endpoints (account, url, events, secret) "
                       "VALUES (%s, %s, '{*}', 'whsec_bench') RETURNING id",
                       (account, url)).fetchone()
    return str(row["id"])


def queue(conn: Any, account: str, n: int) -> None:
    conn.execute("SELECT pgcast_emit_event_v1(%s, 'broadcast.sent', jsonb_build_object("
                 "'broadcast_id', gen_random_uuid(), 'n', g)) FROM generate_series(1, %s) g",
                 (account, n))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process used so far (Linux /proc), in seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time a process used so far (Linux /proc), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def throughput(url: str, deliveries: int, spy: str | None = None,
               host: str = "127.0.0.1") -> dict[str, Any]:
    per_account = deliveries // (ACCOUNTS * ENDPOINTS_PER_ACCOUNT)
    with receiver_process("answer") as (port, rx_pid), common.connect(url) as conn:
        for a in range(ACCOUNTS):
            for _ in range(ENDPOINTS_PER_ACCOUNT):
                endpoint(conn, f"acct{a}", f"http://{host}:{port}/hook")
            queue(conn, f"acct{a}", per_account)
        total = conn.execute("SELECT count(*) AS n FROM webhook_deliveries").fetchone()["n"]
        conn.execute("VACUUM ANALYZE webhook_deliveries")
        dbname = conn.execute("SELECT current_database() AS d").fetchone()["d"]
        # count the record function's calls (its statements per delivery); the worker's
        # sessions start after this
        conn.execute(f'ALTER DATABASE "{dbname}" SET track_functions = \'all\'')
        postmaster = profile_db.postmaster_pid(conn)
        load0 = [round(x, 2) for x in os.getloadavg()]
        with common.Workers(url, count=1, env=ENV) as workers:
            pid = workers.procs[0].pid
            split0, rx0 = cpu_split(pid), cpu_seconds(rx_pid)
            srv0 = profile_db.server_cpu(postmaster)
            xact0 = _xacts(conn, dbname)
            sampler = subprocess.Popen(
                [PY_SPY, "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
                 "--output", spy], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL) if spy else None
            deadline = time.monotonic() + 600
            while conn.execute("SELECT count(*) AS n FROM webhook_deliveries "
                               "WHERE status = 'pending'").fetchone()["n"]:
                if time.monotonic() > deadline:
                    raise TimeoutError("deliveries did not finish in 10 minutes")
                time.sleep(0.2)
            split1, rx_cpu = cpu_split(pid), cpu_seconds(rx_pid) - rx0
            user, system = split1[0] - split0[0], split1[1] - split0[1]
            cpu = user + system
            srv = profile_db.server_cpu(postmaster) - srv0
            xacts = _xacts(conn, dbname) - xact0
            if sampler is not None:
                sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                sampler.wait(timeout=60)
        load1 = [round(x, 2) for x in os.getloadavg()]
        calls = conn.execute("SELECT coalesce(sum(calls), 0) AS n FROM pg_stat_user_functions "
                             "WHERE funcname = 'pgcast_webhook_record_v2'").fetchone()["n"]
        row = conn.execute(
            "SELECT count(*) AS n, extract(epoch FROM max(delivered_at) - min(delivered_at)) "
            "AS span, percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50, "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99, "
            "max(attempts) AS most FROM webhook_deliveries WHERE status = 'delivered'"
        ).fetchone()
    n = int(row["n"])
    return {"deliveries": int(total), "delivered": n, "host": host,
            "endpoints": ACCOUNTS * ENDPOINTS_PER_ACCOUNT,
            "per_second": (n - 1) / float(row["span"]),
            "latency_p50_ms": float(row["p50"]), "latency_p99_ms": float(row["p99"]),
            "max_attempts": int(row["most"]), "worker_cpu_s": cpu,
            "worker_user_s": user, "worker_system_s": system,
            "worker_cpu_ms_per_delivery": cpu / n * 1000,
            "per_worker_cpu_second": n / cpu,
            "server_cpu_ms_per_delivery": srv / n * 1000,
            "receiver_cpu_ms_per_delivery": rx_cpu / n * 1000,
            "record_statements_per_delivery": int(calls) / n,
            "transactions_per_delivery": xacts / n,
            "load_average_before": load0, "load_average_after": load1}


def _xacts(conn: Any, dbname: str) -> int:
    """Transactions committed in the database so far (the server's statistics)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
                            (dbname,)).fetchone()["xact_commit"])


# -- 2. a dead endpoint vs the mail drain ------------------------------------------------------


def drain_once(conn: Any) -> float:
    bid = common.new_draft(conn)
    n, _ = common.send(conn, bid)
    t0 = time.perf_counter()
    common.wait_status(conn, bid)
    return n / (time.perf_counter() - t0)


def leased_by_worker(conn: Any, eid: str) -> None:
    deadline = time.monotonic() + 60
    while not conn.execute("SELECT lease_expires_at > now() AS held FROM webhook_endpoints "
                           "WHERE id = %s", (eid,)).fetchone()["held"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not take the dead endpoint")
        time.sleep(0.05)


def given_back(conn: Any, eid: str) -> None:
    """Wait until no worker holds the endpoint (its attempt in flight ended, within the
    timeout): a round without the dead endpoint has no attempt of it waiting."""
    deadline = time.monotonic() + 60
    while conn.execute("SELECT coalesce(lease_expires_at > now(), false) AS held "
                       "FROM webhook_endpoints WHERE id = %s", (eid,)).fetchone()["held"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not give the dead endpoint back")
        time.sleep(0.05)


def dead_endpoint(url: str, recipients: int, pairs: int, backlog: int) -> dict[str, Any]:
    common.seed_contacts(url, recipients)
    with receiver("silent") as port, common.connect(url) as conn:
        eid = endpoint(conn, common.ACCOUNT, f"http://127.0.0.1:{port}/dead")
        queue(conn, common.ACCOUNT, backlog)
        conn.execute("VACUUM ANALYZE webhook_deliveries")
        with common.Workers(url, count=1, env=ENV):
            drain_once(conn)  # warm up: caches, the worker's first claims
            base: list[float] = []
            dead: list[float] = []
            for i in range(pairs):
                for enabled in ((False, True) if i % 2 == 0 else (True, False)):
                    conn.execute("UPDATE webhook_endpoints SET enabled = %s, disabled_at = "
                                 "CASE WHEN %s THEN NULL ELSE now() END WHERE id = %s",
                                 (enabled, enabled, eid))
                    if enabled:  # the worker holds the endpoint (an attempt waiting) first
                        # the head's backoff restarts: past a few failures its next attempt
                        # would be minutes away, and the round would find the endpoint idle
                        conn.execute("UPDATE webhook_deliveries SET next_attempt_at = now() "
                                     "WHERE id = (SELECT min(id) FROM webhook_deliveries "
                                     "WHERE endpoint_id = %s AND status = 'pending')", (eid,))
                        leased_by_worker(conn, eid)
                    else:
                        given_back(conn, eid)
                    (dead if enabled else base).append(drain_once(conn))
            attempts = conn.execute("SELECT sum(attempts) AS n FROM webhook_deliveries "
                                    "WHERE endpoint_id = %s", (eid,)).fetchone()["n"]
    ratios = [d / b for d, b in zip(dead, base, strict=True)]
    return {"recipients": recipients, "pairs": pairs, "backlog": backlog,
            "drain_per_s_without": base, "drain_per_s_with_dead": dead,
            "median_pair_ratio": statistics.median(ratios),
            "ratio_of_medians": statistics.median(dead) / statistics.median(base),
            "cost_percent": (1 - statistics.median(ratios)) * 100,
            "dead_attempts": int(attempts or 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    p.add_argument("--deliveries", type=int, default=16_000)
    p.add_argument("--recipients", type=int, default=20_000)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--backlog", type=int, default=100_000)
    p.add_argument("--part", choices=["all", "throughput", "dead"], default="all")
    p.add_argument("--runs", type=int, default=1, help="throughput runs (fresh databases)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the endpoints' host: a name is resolved at every delivery")
    p.add_argument("--py-spy", dest="spy", metavar="FILE",
                   help="sample the worker with py-spy into FILE.N (collapsed stacks)")
    args = p.parse_args()
    if args.serve:
        mode, port = args.serve[0], int(args.serve[1])
        if mode == "silent":
            _silent(port)
        else:
            asyncio.run(_serve(port, LATENCY))
        return
    with common.server() as srv:
        if args.part in ("all", "throughput"):
            for run in range(args.runs):
                with common.database(srv, "hooks_tp") as url:
                    tp = throughput(url, args.deliveries,
                                    f"{args.spy}.{run}" if args.spy else None, args.host)
                print(json.dumps({"throughput": tp}), flush=True)
        if args.part in ("all", "dead"):
            with common.database(srv, "hooks_dead") as url:
                dead = dead_endpoint(url, args.recipients, args.pairs, args.backlog)
            print(json.dumps({"dead_endpoint": dead}), flush=True)


if __name__ == "__main__":
    main()
