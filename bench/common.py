"""Shared bench plumbing: one server, fresh databases, worker processes, timing, machine info."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "bench"
POLL = 0.02  # seconds between looks at a broadcast's status while timing a drain
RSS_EVERY = 0.1  # seconds between RSS samples of a worker


@dataclass
class Figure:
    """One measured figure with its aim and the command that reproduces it."""

    key: str
    label: str
    value: float
    unit: str
    aim: str = ""
    passed: bool | None = None  # None: no aim, informational
    command: str = ""
    note: str = ""

    def line(self) -> str:
        """A one-line human rendering."""
        verdict = {True: "pass", False: "MISS", None: ""}[self.passed]
        aim = f"  (aim {self.aim}: {verdict})" if self.aim else ""
        return f"{self.label}: {fmt(self.value)} {self.unit}{aim}"


def fmt(value: float) -> str:
    """A figure with sensible precision."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def command(module: str, *args: str) -> str:
    """The shell command that reproduces a module's figures."""
    return " ".join([".venv/bin/python", "-m", f"bench.{module}", *map(shlex.quote, args)])


def report(figures: list[Figure], cmd: str) -> None:
    """Print a module's figures and how to reproduce them."""
    for f in figures:
        print(f.line())
        if f.note:
            print(f"    {f.note}")
    print(f"reproduce: {cmd}")


def dump(figures: list[Figure], path: Path) -> None:
    """Write figures as JSON (for bench.run)."""
    path.write_text(json.dumps([asdict(f) for f in figures], indent=2))


# -- the server ------------------------------------------------------------------------------


@contextlib.contextmanager
def server() -> Iterator[str]:
    """DATABASE_URL's server, else a fresh embedded Postgres in a temp dir, stopped at the end."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from pgcast.sql import embedded

    base = Path(tempfile.mkdtemp(prefix="pgcast-benchsuite-"))
    os.chmod(base, 0o755)  # pgserver runs Postgres as an unprivileged user when we are root
    try:
        url = embedded.start(base)
        yield url
    finally:
        embedded.discard(base, mode="fast")


def with_dbname(url: str, dbname: str) -> str:
    """The same server, another database."""
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def connect(url: str) -> psycopg.Connection[dict[str, Any]]:
    """An autocommit dict-row connection."""
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


@contextlib.contextmanager
def database(server_url: str, label: str, *, migrated: bool = True) -> Iterator[str]:
    """A new database on the server (pgcast-migrated unless told otherwise), dropped after."""
    name = f"pgcast_bench_{label}_{uuid.uuid4().hex[:6]}"
    with connect(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_dbname(server_url, name)
    try:
        if migrated:
            from pgcast.sql import migrate

            with psycopg.connect(url) as conn:
                migrate.migrate(conn)
        yield url
    finally:
        with connect(server_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def bench_db(label: str, url: str | None = None, *, migrated: bool = True) -> Iterator[str]:
    """A fresh database: on `url`'s server when given, else on a server of our own."""
    if url is not None:
        with database(url, label, migrated=migrated) as db:
            yield db
        return
    with server() as srv, database(srv, label, migrated=migrated) as db:
        yield db


# -- data --------------------------------------------------------------------------------------


def seed_contacts(url: str, n: int, *, tagged: dict[str, int] | None = None) -> None:
    """n contacts of the bench account; tagged[tag] = how many of the first contacts carry it."""
    tags = sorted((tagged or {}).items(), key=lambda kv: kv[1])
    with connect(url) as conn:
        conn.execute(
            "INSERT INTO contacts (account, email, name, tags) "
            "SELECT %(account)s, 'user' || g || '@example.com', 'User ' || g, "
            "  coalesce((SELECT array_agg(t.tag) FROM unnest(%(tags)s::text[], %(upto)s::int[])"
            "            AS t(tag, upto) WHERE g <= t.upto), '{}') "
            "FROM generate_series(1, %(n)s) g",
            {"account": ACCOUNT, "n": n, "tags": [t for t, _ in tags],
             "upto": [u for _, u in tags]})
        # contacts exist long before a send: give them the statistics they would have
        conn.execute("VACUUM ANALYZE contacts")


# What a benchmark broadcast says. plain: no merge tag; merge: three merge tags and the
# unsubscribe link in both parts, a merge tag in the subject (what issue 12 measures).
TEMPLATES: dict[str, dict[str, str | None]] = {
    "plain": {"subject": "Bench", "text": "Hello, this is a benchmark.", "html": None},
    "merge": {
        "subject": "News for {{ contact.name | default('you', true) }}",
        "text": "Hello {{ contact.name | default('friend', true) }},\n\nthis is a benchmark "
                "for {{ contact.email }} on the {{ contact.attributes.plan | default('free') }} "
                "plan.\n\nUnsubscribe: {{ unsubscribe_url }}\n",
        "html": "<p>Hello {{ contact.name | default('friend', true) }},</p><p>this is a "
                "benchmark for {{ contact.email }} on the "
                "{{ contact.attributes.plan | default('free') }} plan.</p>"
                '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'},
}


def new_draft(conn: psycopg.Connection[dict[str, Any]], tag: str | None = None,
              template: str = "plain") -> uuid.UUID:
    """A draft broadcast of the bench account."""
    from pgcast.sql import broadcasts

    t = TEMPLATES[template]
    row = broadcasts.create(conn, ACCOUNT, subject=t["subject"], from_address="bench@example.com",
                            text=t["text"], html=t["html"], tag=tag)
    return uuid.UUID(str(row["id"]))


def send(conn: psycopg.Connection[dict[str, Any]], bid: uuid.UUID) -> tuple[int, float]:
    """Send (snapshot) a draft; return (recipients, seconds)."""
    from pgcast.sql import broadcasts

    t0 = time.perf_counter()
    result = broadcasts.send(conn, ACCOUNT, bid)
    elapsed = time.perf_counter() - t0
    assert result["success"], result
    return int(result["queued"]), elapsed


def wait_status(conn: psycopg.Connection[dict[str, Any]], bid: uuid.UUID,
                timeout: float = 3600.0) -> str:
    """Poll until the broadcast is terminal; return its status."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute("SELECT status FROM broadcasts WHERE id = %s", (bid,)).fetchone()
        assert row is not None
        if row["status"] in ("sent", "failed", "cancelled"):
            return str(row["status"])
        if time.monotonic() > deadline:
            raise TimeoutError(f"broadcast {bid} still {row['status']} after {timeout}s")
        time.sleep(POLL)


# -- processes -------------------------------------------------------------------------------


def child_env(url: str, **extra: str) -> dict[str, str]:
    """The environment of a process we start against `url`."""
    env = dict(os.environ)
    env.update({"DATABASE_URL": url, "PYTHONPATH": str(ROOT), "PGCAST_LOG_LEVEL": "WARNING"})
    env.update(extra)
    return env


class RssSampler:
    """Samples the RSS of some pids in a thread; keeps each one's peak (bytes)."""

    def __init__(self, pids: list[int], every: float = RSS_EVERY) -> None:
        self.peaks = {pid: 0 for pid in pids}
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        """One sample of every pid, plus the kernel's own high-water mark (VmHWM)."""
        for pid in self.peaks:
            with contextlib.suppress(psutil.Error, OSError):
                rss = psutil.Process(pid).memory_info().rss
                self.peaks[pid] = max(self.peaks[pid], rss, _vm_hwm(pid))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()


def _vm_hwm(pid: int) -> int:
    """Peak RSS the kernel recorded for a process (Linux), in bytes; 0 when unknown."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Workers:
    """`pgcast worker` processes started by a benchmark; stopped by pid."""

    url: str
    count: int = 2
    args: list[str] = field(default_factory=lambda: ["--concurrency", "2"])
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    module: str = "pgcast.bin.cli"  # bench.main_renderer: the same CLI with main's plain renderer

    def start(self) -> list[int]:
        """Start the workers and wait until each is listening for control events."""
        env = child_env(self.url, PGCAST_PROVIDER="null", PGCAST_RATE="0", **self.env)
        with connect(self.url) as conn:
            before = _listeners(conn)
            for _ in range(self.count):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", self.module, "worker", *self.args], cwd=ROOT, env=env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True))
            deadline = time.monotonic() + 60
            while _listeners(conn) < before + self.count:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError("workers did not start listening within 60s")
                time.sleep(0.05)
        return [p.pid for p in self.procs]

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                err = p.stderr.read().decode() if p.stderr else ""
                raise RuntimeError(f"worker {p.pid} exited {p.returncode}: {err[-2000:]}")

    def stop(self) -> None:
        """SIGTERM each worker by pid, then SIGKILL what is still there after 30 s."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
            if p.stderr:
                p.stderr.close()
        self.procs.clear()

    def __enter__(self) -> Workers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listeners(conn: psycopg.Connection[dict[str, Any]]) -> int:
    row = conn.execute("SELECT count(*) AS n FROM pg_stat_activity "
                       "WHERE datname = current_database() "
                       "AND query ILIKE 'LISTEN pgcast_control%%'").fetchone()
    return int(row["n"]) if row else 0


# -- timing and the machine -----------------------------------------------------------------


def percentile(samples: list[float], p: float) -> float:
    """The p-th percentile (0-100) by nearest rank."""
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def median(samples: list[float]) -> float:
    """The median."""
    return float(statistics.median(samples))


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine(url: str) -> dict[str, Any]:
    """Cores, memory, CPU, Python and Postgres version and the settings that matter here."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with connect(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        settings = {r["name"]: r["setting"] + (r["unit"] or "") for r in conn.execute(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)",
            (["shared_buffers", "synchronous_commit", "fsync", "max_wal_size",
              "autovacuum", "autovacuum_naptime", "wal_level", "checkpoint_timeout"],))}
    load = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": cpu or platform.processor(),
        "python": platform.python_version(),
        "postgres": version["server_version"] if version else "?",
        "postgres_settings": settings,
        "load_at_start": [round(x, 2) for x in load],
        "embedded": not os.environ.get("DATABASE_URL"),
    }
