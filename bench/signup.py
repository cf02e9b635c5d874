"""Sign-up forms under load (issue 28): POST /f/{id} latency, and how soon the confirmation
reaches the provider while a big broadcast drains.

    python -m bench.signup [--rate 200] [--seconds 15] [--recipients 20000]
                           [--broadcast-rate 100] [--workers 2] [--no-drain]
                           [--profile PREFIX]

One `pgcast api` process (uvicorn) on a fresh database (embedded Postgres in a temp dir, or
DATABASE_URL's server). Open-loop load: a new sign-up (a new address, double opt-in: a contact
row, a signup event and a confirmation message in one transaction) starts every 1/--rate
seconds whatever the earlier ones are doing, each on a free keep-alive connection (256), so a
slow answer delays nobody's start and shows up in the latency (no coordinated omission);
client_lag_p99_ms is the load generator's own delay (scheduled start -> its task running).
Each round prints the CPU its processes used (the API, this load generator, Postgres, the
workers) and what the database's sessions were doing (pg_stat_activity every 10 ms);
--profile PREFIX records the API process with py-spy (collapsed stacks). Each round also
prints the database's work per sign-up (commits, and per function its calls and own time:
track_functions = all), and when the answers slower than SLOW_MS were due (stalls show as
spans), with what the database's sessions were doing in the 60 ms before each.

Round 1: sign-ups alone. Round 2: the same while --workers workers (null provider) drain a
broadcast of --recipients contacts capped at --broadcast-rate emails/s (the broadcast's own
limit); the confirmation's time to the provider is messages.sent_at - created_at (sent_at is
written when the null provider has answered, so it is an upper bound of the hand-over).
The per-client limit (PGCAST_FORM_RATE) is raised for the run: the load comes from one address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench import common

FORM_ID = uuid.UUID("00000000-0000-4000-8000-00000000f0f0")
SLOW_MS = 50  # answers slower than this are listed by when they were due (stalls show as spans)
CONNECTIONS = 256  # keep-alive connections of the load generator (a request waits for a free one)


def _up(base: str) -> bool:
    try:
        urllib.request.urlopen(f"{base}/healthz", timeout=1).close()
        return True
    except OSError:
        return False


class Conn:
    """One keep-alive HTTP/1.1 connection (raw: httpx's overhead would be measured too)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> int:
        """One POST /f/{id}; its status."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST /f/{FORM_ID} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await self.reader.readexactly(length)
        return int(head.split(b" ", 2)[1])


async def load(port: int, rate: float, seconds: float, prefix: str) -> dict[str, Any]:
    """Open-loop sign-ups at `rate`/s for `seconds`; latency percentiles (ms) and statuses."""
    idle: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        idle.put_nowait(Conn(port))
    times: list[float] = []
    lags: list[float] = []  # the load generator's own delay: due -> request written
    statuses: dict[int, int] = {}
    slow: list[float] = []  # when each answer slower than SLOW_MS was due (perf_counter)

    async def one(i: int, due: float) -> None:
        lags.append((time.perf_counter() - due) * 1000)
        conn = await idle.get()
        try:
            status = await conn.post(f"email={prefix}{i}%40example.com&name=N".encode())
        finally:
            idle.put_nowait(conn)
        times.append((time.perf_counter() - due) * 1000)  # from its scheduled start
        if times[-1] > SLOW_MS:
            slow.append(due)
        statuses[status] = statuses.get(status, 0) + 1

    n = int(rate * seconds)
    start = time.perf_counter()
    tasks = []
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    while not idle.empty():
        c = idle.get_nowait()
        if c.writer is not None:
            c.writer.close()
    return {"n": n, "achieved_per_s": n / elapsed, "p50_ms": common.percentile(times, 50),
            "p99_ms": common.percentile(times, 99), "max_ms": max(times), "statuses": statuses,
            "client_lag_p99_ms": common.percentile(lags, 99),
            f"over_{SLOW_MS}ms_due_at_s": _spans([t - start for t in slow]),
            "slow_due": slow}


def _spans(at: list[float], gap: float = 0.1) -> list[str]:
    """Times (s) grouped into spans no more than `gap` apart: 'start-end (count)'."""
    out: list[list[float]] = []
    for t in sorted(at):
        if out and t - out[-1][1] <= gap:
            out[-1][1] = t
            out[-1][2] += 1
        else:
            out.append([t, t, 1])
    return [f"{a:.2f}-{b:.2f} ({int(n)})" for a, b, n in out]


def _to_provider(url: str, prefix: str, timeout: float = 600) -> dict[str, float]:
    """Seconds from a confirmation's creation to its provider answer (p50, p95, max)."""
    with common.connect(url) as conn:
        deadline = time.monotonic() + timeout
        while True:
            row = conn.execute("SELECT count(*) FILTER (WHERE sent_at IS NULL) AS open, "
                               "count(*) AS n FROM messages WHERE to_address LIKE %s",
                               (prefix + "%",)).fetchone()
            assert row is not None
            if row["open"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        rows = conn.execute("SELECT extract(epoch FROM sent_at - created_at) AS s FROM messages "
                            "WHERE to_address LIKE %s AND sent_at IS NOT NULL",
                            (prefix + "%",)).fetchall()
    lag = [float(r["s"]) for r in rows]
    return {"sent": len(lag), "unsent": int(row["open"]), "p50_s": common.percentile(lag, 50),
            "p95_s": common.percentile(lag, 95), "max_s": max(lag)}


class DbStats:
    """What the server did between start and stop: commits, and per function its calls and its
    own time (track_functions = all, set by main), heaviest first."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.before: dict[str, tuple[int, float]] = {}
        self.commits = 0

    def _read(self) -> tuple[int, dict[str, tuple[int, float]]]:
        with common.connect(self.url) as conn:
            time.sleep(1.2)  # backends report their counters at most once a second
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute("SELECT xact_commit AS c FROM pg_stat_database "
                               "WHERE datname = current_database()").fetchone()
            funcs = {r["f"]: (int(r["calls"]), float(r["self_time"])) for r in conn.execute(
                "SELECT funcname AS f, calls, self_time FROM pg_stat_user_functions")}
        assert row is not None
        return int(row["c"]), funcs

    def start(self) -> None:
        self.commits, self.before = self._read()

    def stop(self, per: int, top: int = 16) -> list[str]:
        """Commits and the heaviest functions, each per `per` (the round's sign-ups)."""
        commits, after = self._read()
        rows = []
        for f, (calls, ms) in after.items():
            c0, m0 = self.before.get(f, (0, 0.0))
            if calls > c0:
                rows.append((ms - m0, calls - c0, f))
        rows.sort(reverse=True)
        out = [f"commits per sign-up {(commits - self.commits) / max(1, per):.2f}"]
        out += [f"{f}: {c / max(1, per):.2f} calls, {ms / max(1, per):.3f} ms own time per "
                f"sign-up" for ms, c, f in rows[:top]]
        return out


def _postgres_pids(url: str) -> list[int]:
    """The server's postmaster and its children (the bench's own server, found by data dir)."""
    with common.connect(url) as conn:
        row = conn.execute("SELECT current_setting('data_directory') AS d").fetchone()
    assert row is not None
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if row["d"] in " ".join(proc.info["cmdline"] or []) and proc.ppid() != proc.pid:
                kids = proc.children(recursive=True)
                if kids:
                    return [proc.pid, *[k.pid for k in kids]]
    return []


class Cpu:
    """CPU seconds (user + system) each group of processes used between start and stop."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.before: dict[int, float] = {}
        self.wall = 0.0

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            t = psutil.Process(pid).cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    def start(self) -> None:
        self.wall = time.monotonic()
        self.before = {pid: self._cpu(pid) for pids in self.groups.values() for pid in pids}

    def stop(self) -> dict[str, str]:
        """Per group: CPU seconds and the share of one core over the wall time."""
        wall = time.monotonic() - self.wall
        out = {}
        for name, pids in self.groups.items():
            used = sum(self._cpu(pid) - self.before.get(pid, 0.0) for pid in pids)
            out[name] = f"{used:.1f}s ({100 * used / wall:.0f}% of a core)"
        load = os.getloadavg()
        out["loadavg_1m"] = f"{load[0]:.1f}"
        return out


class Waits:
    """What the database's other sessions are doing, sampled every 10 ms from pg_stat_activity
    (active ones: running on CPU, or waiting on a lock, WAL flush, client, ...)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.counts: dict[str, int] = {}
        self.samples = 0
        self.timeline: list[tuple[float, list[str]]] = []  # (perf_counter, active sessions)
        self.stop_at = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with common.connect(self.url) as conn:
            while not self.stop_at.is_set():
                rows = conn.execute(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w, "
                    "left(regexp_replace(query, '\\s+', ' ', 'g'), 60) AS q "
                    "FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state = 'active' AND pid <> pg_backend_pid()").fetchall()
                self.samples += 1
                keys = [f"{r['w']} | {r['q']}" for r in rows]
                self.timeline.append((time.perf_counter(), keys))
                for key in keys:
                    self.counts[key] = self.counts.get(key, 0) + 1
                time.sleep(0.01)

    def __enter__(self) -> Waits:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_at.set()
        self.thread.join()

    def during(self, due: list[float], n: int = 8, before: float = 0.06) -> list[str]:
        """The most seen (wait, query) pairs in the samples taken from `before` seconds ahead of
        each slow answer's due time to that time: mean sessions in that state then."""
        counts: dict[str, int] = {}
        picked = 0
        marks = sorted(due)
        j = 0
        for t, keys in self.timeline:
            while j < len(marks) and marks[j] < t:
                j += 1
            if j < len(marks) and marks[j] - before <= t:
                picked += 1
                for key in keys:
                    counts[key] = counts.get(key, 0) + 1
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return [f"{c / max(1, picked):.2f} {k}" for k, c in best]

    def top(self, n: int = 8) -> list[str]:
        """The most seen (wait, query) pairs: mean sessions in that state."""
        best = sorted(self.counts.items(), key=lambda kv: -kv[1])[:n]
        return [f"{c / max(1, self.samples):.2f} {k}" for k, c in best]


@contextlib.contextmanager
def _profiled(pid: int, path: str | None, seconds: float) -> Iterator[None]:
    """py-spy record the API process (on-CPU samples, collapsed stacks) while the block runs."""
    if not path:
        yield
        return
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or "py-spy"
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate",
                             "200", "--duration", str(int(seconds) + 1), "--output", path,
                             "--nonblocking"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.wait(timeout=120)


def main(argv: list[str] | None = None) -> int:
    """Run both rounds and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rate", type=float, default=200.0, help="sign-ups per second")
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds of load per round")
    ap.add_argument("--recipients", type=int, default=20_000, help="the broadcast's size")
    ap.add_argument("--broadcast-rate", type=float, default=100.0,
                    help="the broadcast's own limit, emails/s")
    ap.add_argument("--workers", type=int, default=2, help="worker processes")
    ap.add_argument("--no-drain", action="store_true", help="round 1 only")
    ap.add_argument("--profile", default="",
                    help="py-spy the API process: collapsed stacks to PREFIX-idle.txt and "
                         "PREFIX-busy.txt")
    args = ap.parse_args(argv)
    with common.bench_db("signup", os.environ.get("DATABASE_URL")) as url:
        with common.connect(url) as conn:
            conn.execute("ALTER SYSTEM SET track_functions = 'all'")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("INSERT INTO forms (id, account, name, tags, from_address) "
                         "VALUES (%s, %s, 'bench', '{news}', 'news@example.com')",
                         (FORM_ID, common.ACCOUNT))
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        api = subprocess.Popen(
            [sys.executable, "-m", "pgcast.bin.cli", "api", "--port", str(port)], cwd=common.ROOT,
            env=common.child_env(url, PGCAST_JWT_SECRET="bench-secret-0123456789-abcdefghij",
                                 PGCAST_FORM_RATE="100000000"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not _up(base):
                if api.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("pgcast api did not start")
                time.sleep(0.1)
            asyncio.run(load(port, args.rate, 2.0, "warm"))
            groups = {"api": [api.pid], "load generator": [os.getpid()],
                      "postgres": _postgres_pids(url)}
            stats = DbStats(url)
            stats.start()
            cpu = Cpu(groups)
            cpu.start()
            with _profiled(api.pid, args.profile and f"{args.profile}-idle.txt", args.seconds), \
                    Waits(url) as idle_waits:
                idle = asyncio.run(load(port, args.rate, args.seconds, "idle"))
            idle_cpu = cpu.stop()
            idle_db = stats.stop(idle["n"])
            idle.pop("slow_due")
            print(f"round 1, sign-ups alone at {args.rate:.0f}/s: {idle}")
            print(f"round 1, CPU: {idle_cpu}")
            print("round 1, database sessions (mean active, by wait | query):",
                  *idle_waits.top(), sep="\n    ")
            print("round 1, database work:", *idle_db, sep="\n    ")
            if args.no_drain:
                return 0
            common.seed_contacts(url, args.recipients, tagged={"all": args.recipients})
            with common.connect(url) as conn:
                bid = common.new_draft(conn, tag="all")
                conn.execute("UPDATE broadcasts SET rate_limit = %s WHERE id = %s",
                             (args.broadcast_rate, bid))
                with common.Workers(url, count=args.workers) as workers:
                    common.send(conn, bid)
                    time.sleep(2.0)  # the drain under way
                    cpu = Cpu({**groups, "workers": [p.pid for p in workers.procs],
                               "postgres": _postgres_pids(url)})
                    stats.start()
                    sent0 = _sent(conn, bid)
                    cpu.start()
                    with _profiled(api.pid, args.profile and f"{args.profile}-busy.txt",
                                   args.seconds), Waits(url) as busy_waits:
                        busy = asyncio.run(load(port, args.rate, args.seconds, "busy"))
                    busy_cpu = cpu.stop()
                    slow_due = busy.pop("slow_due")
                    drained = _sent(conn, bid) - sent0
                    busy_db = stats.stop(busy["n"])
                    lag = _to_provider(url, "busy")
                    progress = conn.execute("SELECT status, sent, total FROM broadcasts "
                                            "WHERE id = %s", (bid,)).fetchone()
            print(f"round 2, sign-ups at {args.rate:.0f}/s while {args.recipients} recipients "
                  f"drain at {args.broadcast_rate:.0f}/s: {busy}")
            print(f"round 2, CPU: {busy_cpu}")
            print("round 2, database sessions (mean active, by wait | query):",
                  *busy_waits.top(), sep="\n    ")
            print(f"round 2, the same in the 60 ms before each answer over {SLOW_MS} ms was due:",
                  *busy_waits.during(slow_due), sep="\n    ")
            print(f"round 2, database work ({drained} broadcast emails sent in the round):",
                  *busy_db, sep="\n    ")
            print(f"round 2, confirmation creation -> provider answer: {lag}")
            print(f"broadcast when round 2 ended: {progress}")
        finally:
            api.terminate()
            api.wait(timeout=30)
    return 0


def _sent(conn: Any, bid: uuid.UUID) -> int:
    """The broadcast's recipients handed to the provider so far."""
    row = conn.execute("SELECT count(*) AS n FROM broadcast_recipients WHERE broadcast_id = %s "
                       "AND status <> 'pending'", (bid,)).fetchone()
    return int(row["n"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
