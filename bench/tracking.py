"""Click redirects and the stats report over real HTTP (issue 29's bar).

    python -m bench.tracking [--requests 2000] [--clients 32] [--seconds 10]
                             [--recipients 1000000] [--events 200000] [--stats-requests 300]

Starts `pgcast api` (uvicorn, one process) on an embedded Postgres in a temp dir (or on
DATABASE_URL, in a fresh database dropped at the end). One `contact`-mode broadcast with
--recipients recipient rows and 20 stored links; --events opens and clicks written through
pgcast_track_v1 (the API's own batch statement) spread over 72 hours.

A load generator in a process of its own (it does nothing else; gc frozen) then measures:
GET /c/{token} p50/p99 of --requests sequential requests on one keep-alive connection, then
redirects/s with --clients connections for --seconds, each request a different contact's
token (every one recorded: the events written are counted after the API stopped, which
writes its buffer). First, on the quiet server, GET /broadcasts/{id}/stats p50/p99,
--stats-requests sequential requests.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench import common
from bench.api import fill, pct
from pgcast.api import auth, config
from pgcast.mail import tracking, unsubscribe
from pgcast.sql import migrate

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-0123456789-abcdefghijklmnop"
ACCOUNT = "bench"
LINKS = 20
BASE = "https://mail.example.org"


class Client:
    """A minimal HTTP/1.1 keep-alive client: the status of each answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, request: bytes) -> int:
        """One request; its status."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        if length:
            await self.reader.readexactly(length)
        return int(head.split(b" ", 2)[1])

    async def close(self) -> None:
        """Close the connection."""
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


def click_request(token: str) -> bytes:
    """A browser's GET of a tracked link."""
    return (f"GET /c/{token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Mozilla/5.0 (X11; "
            "Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
            "\r\n\r\n").encode()


async def _load(port: int, tokens: list[str], requests: int, clients: int, seconds: float,
                stats_path: str, jwt: str, stats_requests: int) -> dict[str, float]:
    gc.freeze()  # a benchmark never measures itself (STYLE 21)
    out: dict[str, float] = {}
    stats = Client(port)
    req = (f"GET {stats_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {jwt}"
           "\r\n\r\n").encode()
    await stats.get(req)
    times = []
    for _ in range(stats_requests):
        t0 = time.perf_counter()
        assert await stats.get(req) == 200
        times.append((time.perf_counter() - t0) * 1000)
    out["stats_p50"], out["stats_p99"] = pct(times, 50), pct(times, 99)
    # the same connection's /healthz (one trivial query): the floor of a database round trip
    # through this server, measured in the same run
    health = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    times = []
    for _ in range(stats_requests):
        t0 = time.perf_counter()
        assert await stats.get(health) == 200
        times.append((time.perf_counter() - t0) * 1000)
    out["health_p50"], out["health_p99"] = pct(times, 50), pct(times, 99)
    await stats.close()
    one = Client(port)
    for t in tokens[:50]:  # warm: the connection, the link cache, the token keys
        assert await one.get(click_request(t)) == 302
    times = []
    for i in range(requests):
        req = click_request(tokens[(50 + i) % len(tokens)])
        t0 = time.perf_counter()
        status = await one.get(req)
        times.append((time.perf_counter() - t0) * 1000)
        assert status == 302, status
    out["seq_p50"], out["seq_p99"] = pct(times, 50), pct(times, 99)
    await one.close()
    pool = [Client(port) for _ in range(clients)]
    done = 0
    stop = time.perf_counter() + seconds
    latencies: list[float] = []

    async def run(c: Client, k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop:
            req = click_request(tokens[i % len(tokens)])
            t0 = time.perf_counter()
            assert await c.get(req) == 302
            latencies.append((time.perf_counter() - t0) * 1000)
            done += 1
            i += clients

    t0 = time.perf_counter()
    await asyncio.gather(*(run(c, k) for k, c in enumerate(pool)))
    out["rps"] = done / (time.perf_counter() - t0)
    out["sent"] = float(requests + 50 + done)
    out["load_p50"], out["load_p99"] = pct(latencies, 50), pct(latencies, 99)
    for c in pool:
        await c.close()
    return out


def load_generator(queue: Any, *args: Any) -> None:
    """The load generator's process: measure, put the figures on the queue."""
    queue.put(asyncio.run(_load(*args)))


def prepare(url: str, recipients: int, events: int) -> tuple[uuid.UUID, list[str]]:
    """The broadcast, its links and events; tokens of distinct contacts for every link."""
    with psycopg.connect(url, autocommit=True) as conn:
        migrate.migrate(conn)
        t0 = time.perf_counter()
        bid = fill(conn, recipients, 1)
        conn.execute("UPDATE broadcasts SET track = 'contact', delivered = sent WHERE id = %s",
                     (bid,))
        urls = [f"https://example.com/article/{i}?utm_source=news&x=é#part" for i in range(LINKS)]
        conn.execute("SELECT * FROM pgcast_links_store_v1(%s, %s)", (bid, urls))
        rng = random.Random(29)
        now = time.time()
        batch = 10_000
        for start in range(0, events, batch):
            n = min(batch, events - start)
            kinds = ["open" if rng.random() < 0.6 else "click" for _ in range(n)]
            conn.execute(
                "SELECT pgcast_track_v1(%s, %s, %s, %s, %s, %s, 'pgcast')",
                ([bid] * n,
                 [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - rng.random() * 72 * 3600))
                  for _ in range(n)],
                 kinds, [rng.randrange(LINKS) if k == "click" else None for k in kinds],
                 [rng.randrange(1, recipients + 1) for _ in range(n)],
                 [rng.random() < 0.3 for _ in range(n)]))
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
        row = conn.execute("SELECT secret FROM unsubscribe_keys").fetchone()
        assert row is not None
        print(f"filled {recipients:,} recipients and {events:,} events in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    keys = unsubscribe.Keys((row[0],))
    tracker = tracking.Tracker(str(bid), "contact", tuple(urls), keys, BASE)
    tokens = []
    for contact in range(1, 20_001):
        make = tracker._maker(contact)
        tokens.append(make(tracking.KIND_CLICK, contact % LINKS))
    return bid, tokens


def run(url: str, args: argparse.Namespace) -> dict[str, float]:
    """Prepare, serve, measure in the load generator's process; count what was recorded."""
    bid, tokens = prepare(url, args.recipients, args.events)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, DATABASE_URL=url, PGCAST_JWT_SECRET=SECRET, PGCAST_LOG_LEVEL="warning",
               PGCAST_PUBLIC_URL=BASE)
    server = subprocess.Popen([sys.executable, "-m", "pgcast.bin.cli", "api", "--port", str(port)],
                              cwd=ROOT, env=env, start_new_session=True)
    with psycopg.connect(url, autocommit=True) as conn:
        before = conn.execute("SELECT count(*) FROM tracking_events").fetchone()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("pgcast api did not start") from None
                time.sleep(0.1)
        jwt = auth.make_token(config.from_env({"PGCAST_JWT_SECRET": SECRET}), ACCOUNT, "bench")
        queue: Any = multiprocessing.get_context("spawn").Queue()
        gen = multiprocessing.get_context("spawn").Process(
            target=load_generator, args=(queue, port, tokens, args.requests, args.clients,
                                         args.seconds, f"/broadcasts/{bid}/stats", jwt,
                                         args.stats_requests))
        gen.start()
        figures: dict[str, float] = queue.get(timeout=600)
        gen.join()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the lifespan's end writes the buffer
        server.wait(timeout=60)
    with psycopg.connect(url, autocommit=True) as conn:
        after = conn.execute("SELECT count(*) FROM tracking_events").fetchone()
    assert before is not None and after is not None
    figures["recorded"] = float(after[0] - before[0])
    return figures


def main() -> int:
    """Print the figures and the command."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--recipients", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--stats-requests", type=int, default=300)
    args = p.parse_args()
    command = "python -m bench.tracking " + shlex.join(sys.argv[1:])
    # DATABASE_URL's server, else an embedded one of its own; a fresh database dropped after
    with common.bench_db("tracking", os.environ.get("DATABASE_URL"), migrated=False) as url:
        f = run(url, args)
    print(f"$ {command.strip()}")
    print("GET /c/{token} over HTTP (uvicorn, 1 API process; load generator in its own process)")
    print(f"  sequential, one connection: p50 {f['seq_p50']:.2f} ms, p99 {f['seq_p99']:.2f} ms "
          f"({args.requests} requests)")
    print(f"  {args.clients} connections for {args.seconds:g}s: {f['rps']:.0f} redirects/s, "
          f"p50 {f['load_p50']:.2f} ms, p99 {f['load_p99']:.2f} ms")
    print(f"  events recorded: {f['recorded']:.0f} of {f['sent']:.0f} clicks")
    print(f"GET /broadcasts/{{id}}/stats, {args.recipients:,} recipients, {args.events:,} events: "
          f"p50 {f['stats_p50']:.2f} ms, p99 {f['stats_p99']:.2f} ms "
          f"({args.stats_requests} requests)")
    print(f"GET /healthz on the same connection (one trivial query): p50 {f['health_p50']:.2f} ms, "
          f"p99 {f['health_p99']:.2f} ms")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
