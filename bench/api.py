"""Progress endpoint latency over real HTTP, 1,000,000 recipients vs 1,000 (O(1) or not).

    python -m bench.api [--requests 1000] [--clients 50] [--big 1000000] [--small 1000]
                        [--detail-requests 200]

Starts `pgcast api` (uvicorn, its own process) on an embedded Postgres in a temp dir (or on
DATABASE_URL, in a fresh database dropped at the end), fills one broadcast with --big recipient
rows and one with --small straight from generate_series, then for each: p50/p99 of --requests
sequential GET /broadcasts/{id}/progress, and requests/s with --clients concurrent clients.
Then every request the dashboard's detail view makes (the broadcast, its audit log, the first
recipient page as the view opens it, the event stream's first event), and the recipient
filters a user can pick, --detail-requests times each at both sizes (0 skips this part).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench import common
from pgcast.api import auth, config
from pgcast.sql import migrate

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-0123456789-abcdefghijklmnop"
ACCOUNT = "bench"


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def fill(conn: psycopg.Connection[Any], n: int, start: int) -> uuid.UUID:
    """A sending broadcast with n recipients (contacts start..start+n-1), half of them sent."""
    conn.execute("INSERT INTO contacts (account, email) SELECT %s, 'c' || g || '@example.com' "
                 "FROM generate_series(%s::bigint, %s::bigint) g", (ACCOUNT, start, start + n - 1))
    row = conn.execute(
        "INSERT INTO broadcasts (account, status, subject, from_address, text_body, total, sent, "
        "started_at) VALUES (%s, 'sending', 'bench', 'a@example.com', 'x', %s, %s, "
        "now() - interval '60 s') RETURNING id", (ACCOUNT, n, n // 2)).fetchone()
    assert row is not None
    bid: uuid.UUID = row[0]
    part = conn.execute("SELECT pgcast_partition_create_v3(%s)", (bid,)).fetchone()
    assert part is not None
    conn.execute(
        f"INSERT INTO {part[0]} (broadcast_id, contact_id, email, status, worker, sent_at) "
        "SELECT %s, c.id, c.email, CASE WHEN c.id - %s < %s THEN 'sent' ELSE 'pending' END, "
        "CASE WHEN c.id - %s < %s THEN 'bench' END, "
        "CASE WHEN c.id - %s < %s THEN now() END FROM contacts c "
        "WHERE c.account = %s AND c.id BETWEEN %s AND %s",
        (bid, start, n // 2, start, n // 2, start, n // 2, ACCOUNT, start, start + n - 1))
    conn.execute("SELECT pgcast_partition_attach_v2(%s)", (bid,))
    return bid


class Client:
    """A minimal HTTP/1.1 keep-alive client (httpx's own overhead under 50-way concurrency
    would dominate what we want to measure: the server)."""

    def __init__(self, port: int, request: bytes) -> None:
        self.port, self.request = port, request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self) -> bytes:
        """One request; the body of a 200."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await self.reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {body[:200]!r}")
        return body

    async def close(self) -> None:
        """Close the connection."""
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


def _request(path: str, token: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode()


# What the dashboard's detail view asks when it opens (and again on a status change), and the
# recipient filters a user may pick; `pending` is the one documented as slow, never a default.
DETAIL_VIEW = [
    ("GET /broadcasts/{id}", "/broadcasts/{id}"),
    ("GET .../audit", "/broadcasts/{id}/audit"),
    ("GET .../recipients (view default)", "/broadcasts/{id}/recipients?limit=25"),
    ("GET .../events, first event", "/broadcasts/{id}/events"),
    ("GET /broadcasts?limit=25 (list)", "/broadcasts?limit=25"),
    ("recipients ?status=sent", "/broadcasts/{id}/recipients?status=sent&limit=25"),
    ("recipients ?status=failed", "/broadcasts/{id}/recipients?status=failed&limit=25"),
    ("recipients ?status=pending", "/broadcasts/{id}/recipients?status=pending&limit=25"),
]
SLOW_FILTER_SHARE = 10  # the pending filter runs 1/10 of the requests: ~0.1 s each at 1M


async def first_event(port: int, token: str, path: str) -> float:
    """ms from opening an event stream to its first `progress` event (then it is closed)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_request(path, token))
        head = await reader.readuntil(b"\r\n\r\n")
        if head.split(b" ", 2)[1] != b"200":
            raise RuntimeError(f"event stream answered {head[:100]!r}")
        await reader.readuntil(b"event: progress")
        await reader.readuntil(b"\n\n")
        return (time.perf_counter() - t0) * 1000
    finally:
        writer.close()
        await writer.wait_closed()


async def measure_detail(port: int, token: str, bid: uuid.UUID,
                         requests: int) -> dict[str, dict[str, float]]:
    """p50/p99 (ms) of each request of the detail view, sequential, one keep-alive client."""
    out: dict[str, dict[str, float]] = {}
    for label, template in DETAIL_VIEW:
        path = template.replace("{id}", str(bid))
        n = max(1, requests // SLOW_FILTER_SHARE) if "pending" in path else requests
        times: list[float] = []
        if "/events" in path:
            for _ in range(n):
                times.append(await first_event(port, token, path))
        else:
            client = Client(port, _request(path, token))
            try:
                await client.get()  # warm
                for _ in range(n):
                    t0 = time.perf_counter()
                    await client.get()
                    times.append((time.perf_counter() - t0) * 1000)
            finally:
                await client.close()
        out[label] = {"p50": pct(times, 50), "p99": pct(times, 99), "n": n}
    return out


async def measure(port: int, token: str, bid: uuid.UUID, requests: int,
                  clients: int) -> dict[str, float]:
    """p50/p99 (ms) of sequential requests, then requests/s with `clients` at once."""
    request = _request(f"/broadcasts/{bid}/progress", token)
    pool = [Client(port, request) for _ in range(clients)]
    try:
        for c in pool:  # warm: connections, prepared statements, caches
            await c.get()
        times: list[float] = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await pool[0].get()
            times.append((time.perf_counter() - t0) * 1000)

        async def run(c: Client, k: int) -> None:
            for _ in range(k):
                await c.get()

        per = max(1, requests * 2 // clients)
        t0 = time.perf_counter()
        await asyncio.gather(*(run(c, per) for c in pool))
        rps = per * clients / (time.perf_counter() - t0)
    finally:
        for c in pool:
            await c.close()
    return {"p50": pct(times, 50), "p99": pct(times, 99), "rps": rps}


def _up(base: str) -> bool:
    try:
        urllib.request.urlopen(f"{base}/healthz", timeout=1).close()
        return True
    except OSError:
        return False


Figures = dict[str, dict[str, float]]


def run(url: str, args: argparse.Namespace) -> tuple[Figures, dict[int, Figures]]:
    """Fill, serve, measure; return the progress figures, and the detail view's per size."""
    with psycopg.connect(url, autocommit=True) as conn:
        migrate.migrate(conn)
        t0 = time.perf_counter()
        ids = {args.big: fill(conn, args.big, 1), args.small: fill(conn, args.small, args.big + 1)}
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")  # the fill's dirty pages are not flushed during the runs
        print(f"filled {args.big + args.small} recipient rows in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, DATABASE_URL=url, PGCAST_JWT_SECRET=SECRET, PGCAST_LOG_LEVEL="warning")
    server = subprocess.Popen([sys.executable, "-m", "pgcast.bin.cli", "api", "--port", str(port)],
                              cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _up(base):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pgcast api did not start")
            time.sleep(0.1)
        token = auth.make_token(config.from_env({"PGCAST_JWT_SECRET": SECRET}), ACCOUNT, "bench")
        figures = {}
        # alternate the two sizes (small, big, small, big) so a noisy neighbour hits both
        for round_ in (1, 2):
            for n, bid in sorted(ids.items()):
                figures[f"{n:,} recipients #{round_}"] = asyncio.run(
                    measure(port, token, bid, args.requests, args.clients))
        detail = {n: asyncio.run(measure_detail(port, token, bid, args.detail_requests))
                  for n, bid in sorted(ids.items())} if args.detail_requests else {}
        return figures, detail
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def main() -> int:
    """Print the figures and the command."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--big", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--detail-requests", type=int, default=200)
    args = p.parse_args()
    command = "python -m bench.api " + shlex.join(sys.argv[1:])
    # DATABASE_URL's server, else an embedded one of its own; a fresh database dropped after
    with common.bench_db("api", os.environ.get("DATABASE_URL"), migrated=False) as url:
        figures, detail = run(url, args)
    print(f"$ {command.strip()}")
    print(f"GET /broadcasts/{{id}}/progress over HTTP (uvicorn, 1 process), "
          f"{args.requests} sequential requests, then {args.clients} concurrent clients")
    print(f"{'broadcast':<26}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>10}")
    for label, f in figures.items():
        print(f"{label:<26}{f['p50']:>9.2f}{f['p99']:>9.2f}{f['rps']:>10.0f}")
    if detail:
        small, big = sorted(detail)
        print(f"\nthe dashboard's detail view: each request {args.detail_requests} times "
              f"(pending filter 1/{SLOW_FILTER_SHARE}), sequential, one keep-alive connection")
        heads = [f"p50 ms {small:,}", f"p50 ms {big:,}", f"p99 ms {small:,}", f"p99 ms {big:,}"]
        print(f"{'request':<36}" + "".join(f"{x:>18}" for x in heads))
        for label in detail[small]:
            a, b = detail[small][label], detail[big][label]
            print(f"{label:<36}" + "".join(f"{v:>18.2f}" for v in (
                a["p50"], b["p50"], a["p99"], b["p99"])))
    print(f"load average at the end: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
