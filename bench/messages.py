"""Transactional messages under a draining broadcast (issue 26).

Two default `pgcast worker` processes (ses provider) against a local SES endpoint (bench.sesd,
in a process of its own that does nothing else: it timestamps each SendEmail as it arrives),
one global rate of 100/s. A 20,000-recipient broadcast drains while messages are committed at
5/s, alternately through `POST /messages` (a `pgcast api` process) and through
`SELECT pgcast_send_message(...)` in a transaction of the bench's own. Measured:

- each message's latency from its commit (the request's start for the API, COMMIT's start for
  SQL: both a little before the real commit, so the figures err high) to the moment its
  SendEmail reached the endpoint: p50, p95, p99;
- the most SendEmail requests of any kind in any 1-second window (limit: rate + burst);
- the broadcast's rate over the phase against what the messages left (rate - messages/s);
- then, with nothing else running, the same latency for messages alone (idle).

time.monotonic() is CLOCK_MONOTONIC, one clock for every process of the machine.

    .venv/bin/python -m bench.messages [--seconds 60] [--idle-seconds 20]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import jwt

from bench import common, ratelimit, sesd
from pgcast.sql import broadcasts

RATE = 100.0  # emails/s
RECIPIENTS = 20_000
PER_SECOND = 5.0  # messages enqueued per second
LATENCY = 0.05  # seconds the endpoint takes to answer
SECRET = "bench-jwt-secret-0123456789-abcdefghijkl"
SQL_SEND = ("SELECT pgcast_send_message('bench', %s, 'Your receipt', 'Thanks!', NULL, "
            "'shop@bench.example', %s)")


def serve_endpoint(out: str, port_file: str) -> None:
    """The endpoint's own process: serve until SIGTERM, then write what it received."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with sesd.running(LATENCY) as endpoint:
        Path(port_file).write_text(str(endpoint.port))
        done.wait()
        got = [(r.at, r.to) for r in endpoint.snapshot()]
    Path(out).write_text(json.dumps(got))


class Endpoint:
    """The endpoint process: started, its port read, stopped, its records read."""

    def __init__(self, tmp: Path) -> None:
        self.out = tmp / "received.json"
        port_file = tmp / "port"
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.messages", "--serve-endpoint",
                                      str(self.out), str(port_file)], cwd=common.ROOT,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the endpoint did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def env(self) -> dict[str, str]:
        """boto3's settings for a worker sending here."""
        e = sesd.Endpoint(port=self.port)
        return e.env()

    def stop(self) -> list[tuple[float, str]]:
        """Stop it; (arrival, address) of every SendEmail."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        return [(float(a), str(t)) for a, t in json.loads(self.out.read_text())]


class Enqueuer:
    """Commits messages at PER_SECOND, alternately through the API and SQL; their times."""

    def __init__(self, url: str, api: str) -> None:
        self.url = url
        self.api = api
        self.committed: dict[str, tuple[float, str]] = {}  # address -> (time, way)
        self.token = jwt.encode({"sub": "bench", "account": "bench",
                                 "exp": int(time.time()) + 86400}, SECRET, algorithm="HS256")

    def run(self, seconds: float, label: str) -> None:
        """Enqueue for `seconds`, one message every 1 / PER_SECOND."""
        with common.connect(self.url) as conn:
            conn.autocommit = False
            start = time.monotonic()
            i = 0
            while time.monotonic() - start < seconds:
                due = start + i / PER_SECOND
                time.sleep(max(0.0, due - time.monotonic()))
                to = f"{label}-{i}@bench.example"
                if i % 2 == 0:
                    t = self._api(to, f"{label}-{i}")
                    self.committed[to] = (t, "api")
                else:
                    conn.execute(SQL_SEND, (to, f"{label}-{i}"))
                    t = time.monotonic()
                    conn.commit()
                    self.committed[to] = (t, "sql")
                i += 1

    def _api(self, to: str, key: str) -> float:
        body = json.dumps({"to": to, "from": "shop@bench.example", "subject": "Your receipt",
                           "text": "Thanks!", "idempotency_key": key}).encode()
        req = urllib.request.Request(f"{self.api}/messages", data=body, method="POST", headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        t = time.monotonic()
        with urllib.request.urlopen(req, timeout=30) as r:
            if r.status != 202:
                raise RuntimeError(f"POST /messages answered {r.status}")
        return t


def latencies(enq: Enqueuer, received: list[tuple[float, str]], label: str) -> list[float]:
    """Seconds from commit to the endpoint, per message of this phase."""
    first = {}
    for at, to in received:
        first.setdefault(to, at)
    return [first[to] - t for to, (t, _) in enq.committed.items()
            if to.startswith(label) and to in first]


def main(argv: list[str] | None = None) -> int:
    """Run both phases and print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.messages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="the loaded phase (default 60)")
    parser.add_argument("--idle-seconds", type=float, default=20.0,
                        help="the idle phase (default 20)")
    parser.add_argument("--serve-endpoint", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_endpoint:
        serve_endpoint(*args.serve_endpoint)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="pgcast-bench-messages-"))
    burst = 5.0  # default_burst(100)
    with common.server() as srv, common.database(srv, "messages") as url:
        common.seed_contacts(url, RECIPIENTS)
        endpoint = Endpoint(tmp)
        api_port = common_free_port()
        env = common.child_env(url, **endpoint.env(), PGCAST_RATE=str(RATE),
                               PGCAST_BURST=str(burst), PGCAST_JWT_SECRET=SECRET,
                               PGCAST_LOG_LEVEL="WARNING")
        cli = [sys.executable, "-m", "pgcast.bin.cli"]
        api = subprocess.Popen([*cli, "api", "--port", str(api_port)], cwd=common.ROOT, env=env,
                               stdout=subprocess.DEVNULL,
                               stderr=(tmp / "api.log").open("w"), start_new_session=True)
        workers = [subprocess.Popen([*cli, "worker"], cwd=common.ROOT,
                                    env=env, stdout=subprocess.DEVNULL,
                                    stderr=(tmp / f"worker-{i}.log").open("w"),
                                    start_new_session=True) for i in range(2)]
        received: list[tuple[float, str]] = []
        try:
            with common.connect(url) as conn:
                ratelimit._wait(lambda: ratelimit._listeners(conn) >= 2, 60, "the workers")
                ratelimit._wait(lambda: _healthy(api_port), 60, "the API")
                enq = Enqueuer(url, f"http://127.0.0.1:{api_port}")
                gc.freeze()
                # idle: nothing else to send
                enq.run(args.idle_seconds, "idle")
                time.sleep(2)
                bid = common.new_draft(conn)
                assert broadcasts.send(conn, common.ACCOUNT, bid)["success"]
                time.sleep(5)  # the broadcast is draining
                started = time.monotonic()
                enq.run(args.seconds, "load")
                ended = time.monotonic()
                time.sleep(3)
                broadcasts.cancel(conn, common.ACCOUNT, bid)
                # the handoffs (database clock) of the load phase: what the grants allowed
                handed = [float(r["t"]) for r in conn.execute(
                    "SELECT extract(epoch FROM handed_at)::float8 AS t FROM broadcast_recipients "
                    "WHERE handed_at IS NOT NULL UNION ALL "
                    "SELECT extract(epoch FROM handed_at)::float8 FROM messages "
                    "WHERE handed_at IS NOT NULL AND to_address LIKE 'load-%%'").fetchall()]
                span_db = conn.execute(
                    "SELECT extract(epoch FROM min(created_at))::float8 AS a, "
                    "extract(epoch FROM max(created_at))::float8 AS b FROM messages "
                    "WHERE to_address LIKE 'load-%%'").fetchone()
        finally:
            for p in [*workers, api]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
            for p in [*workers, api]:
                p.wait(timeout=60)
            received = endpoint.stop()
    idle = latencies(enq, received, "idle")
    load = latencies(enq, received, "load")
    window = [at for at, _ in received if started <= at <= ended]
    bcast = [at for at, to in received if started <= at <= ended and to.startswith("user")]
    msgs = [at for at, to in received if started <= at <= ended and to.startswith("load")]
    span = ended - started
    left = RATE - len(msgs) / span
    print(f"2 workers (defaults), ses provider -> local endpoint ({LATENCY * 1000:.0f} ms), "
          f"rate {RATE:g}/s burst {burst:g}, {RECIPIENTS} recipients, "
          f"{PER_SECOND:g} messages/s (half API, half SQL), cpus {os.cpu_count()}")
    _lat("under load", load, len([a for a in enq.committed if a.startswith("load")]))
    _lat("idle", idle, len([a for a in enq.committed if a.startswith("idle")]))
    print(f"most SendEmail in any 1 s window during the load phase: "
          f"{ratelimit.max_in_window(sorted(window), 1.0)} (limit rate + burst = "
          f"{RATE + burst:g})")
    assert span_db is not None
    in_phase = sorted(t for t in handed if span_db["a"] <= t <= span_db["b"])
    print(f"most handoffs (recipients and messages) in any 1 s window of the load phase: "
          f"{ratelimit.max_in_window(in_phase, 1.0)}")
    seconds = collections.Counter(int(at - started) for at in window)
    print("busiest seconds at the endpoint (second of the phase: requests): " + ", ".join(
        f"{k}: {v}" for k, v in seconds.most_common(5)))
    print(f"load phase {span:.1f} s: messages {len(msgs) / span:.2f}/s, broadcast "
          f"{len(bcast) / span:.2f}/s = {len(bcast) / span / left:.3f} of the remainder "
          f"({left:.2f}/s)")
    print(f"reproduce: {common.command('messages', '--seconds', f'{args.seconds:g}')}")
    return 0


def _lat(label: str, samples: list[float], committed: int) -> None:
    if not samples:
        print(f"{label}: no message reached the endpoint")
        return
    print(f"{label}: {len(samples)}/{committed} messages, commit -> provider call "
          f"p50 {common.percentile(samples, 50) * 1000:.0f} ms, "
          f"p95 {common.percentile(samples, 95) * 1000:.0f} ms, "
          f"p99 {common.percentile(samples, 99) * 1000:.0f} ms, "
          f"max {max(samples) * 1000:.0f} ms")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def common_free_port() -> int:
    """A free loopback port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
