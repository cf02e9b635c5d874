"""Database cost per recipient: pgcast's null-provider drain vs the floor, same server and run.

Counts, between a mark before and a mark after each drain (issue 32's profile):
- top-level statements per recipient, grouped by their first words, with their share of the
  count and of the server time (log_min_duration_statement = 0 on the two databases, counted in
  the server log: the embedded Postgres (pgserver) ships no pg_stat_statements, so statements
  run *inside* plpgsql functions are not in this count; track_functions = all counts the calls
  of those functions instead);
- transactions (pg_stat_database.xact_commit, the profiler's own polls taken out), with the
  rollbacks and the deadlocks Postgres detected;
- rows inserted / updated / deleted per recipient and table (pg_stat_user_tables; a partition
  counts under its parent), HOT updates among them;
- WAL bytes, WAL records and full-page images per recipient (pg_current_wal_lsn before and
  after, pg_wal_lsn_diff; pg_stat_wal). WAL is the whole server's: nothing else runs on it.

    .venv/bin/python -m bench.profile_db --recipients 200000

The drain rates printed are with every statement logged (slower than bench.drain/bench.floor);
their ratio is what compares.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import psycopg

from bench import common, floor

LOG_PREFIX = "%m [%p] db=%d "
ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \S+ \[(\d+)\] db=(\S*) (.*)$")
DURATION = re.compile(r"duration: ([\d.]+) ms\s+(statement|execute [^:]*): (.*)$")


@dataclass
class Snap:
    """The server's counters at one moment."""

    lsn: str
    wal: dict[str, int]
    db: dict[str, int]
    tables: dict[str, dict[str, int]]
    functions: dict[str, dict[str, float]]
    log_at: int  # bytes of the server log so far


@dataclass
class Cost:
    """What one drain cost, between two Snaps."""

    label: str
    recipients: int
    seconds: float
    wal_bytes: int
    wal: dict[str, int]
    db: dict[str, int]
    tables: dict[str, dict[str, int]]
    functions: dict[str, dict[str, float]]
    statements: collections.Counter[str] = field(default_factory=collections.Counter)
    send_wal_bytes: int = 0  # of those, the send (snapshot) statement's
    send_wal_records: int = 0
    records: list[tuple[str, int, int]] = field(default_factory=list)  # pg_waldump, the drain
    send_s: float = 0.0
    server_cpu: float = 0.0  # seconds of CPU of the server's processes during the drain
    client_cpu: float = 0.0  # seconds of CPU of the draining processes (workers / floor's)
    statement_ms: dict[str, float] = field(
        default_factory=lambda: collections.defaultdict(float))

    def per(self, n: float) -> float:
        """n per recipient."""
        return n / self.recipients


def snap(conn: psycopg.Connection[dict[str, Any]], log: Path) -> Snap:
    """Counters now (stats of other backends as flushed so far)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    lsn = conn.execute("SELECT pg_current_wal_lsn()::text AS l").fetchone()
    wal = conn.execute("SELECT wal_records, wal_fpi, wal_bytes::bigint AS wal_bytes "
                       "FROM pg_stat_wal").fetchone()
    db = conn.execute("SELECT xact_commit, xact_rollback, deadlocks, tup_inserted, "
                      "tup_updated, tup_deleted, tup_returned, tup_fetched, blks_hit, blks_read "
                      "FROM pg_stat_database WHERE datname = current_database()").fetchone()
    tables: dict[str, dict[str, int]] = collections.defaultdict(collections.Counter)
    for r in conn.execute(
            "SELECT coalesce((SELECT i.inhparent::regclass::text FROM pg_inherits i "
            "                 WHERE i.inhrelid = t.relid), t.relname) AS rel, "
            "       n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del "
            "FROM pg_stat_user_tables t"):
        for k in ("n_tup_ins", "n_tup_upd", "n_tup_hot_upd", "n_tup_del"):
            tables[r["rel"]][k] += int(r[k])
    functions = {r["f"]: {"calls": float(r["calls"]), "self_ms": float(r["self_time"]),
                          "total_ms": float(r["total_time"])}
                 for r in conn.execute("SELECT funcname AS f, calls, self_time, total_time "
                                       "FROM pg_stat_user_functions")}
    assert lsn is not None and wal is not None and db is not None
    return Snap(lsn["l"], dict(wal), {k: int(v) for k, v in db.items()}, dict(tables),
                functions, log.stat().st_size)


def cost(conn: psycopg.Connection[dict[str, Any]], label: str, n: int, seconds: float,
         a: Snap, b: Snap, lsn_done: str, polls: int, log: Path, dbname: str,
         skip_pids: set[int]) -> Cost:
    """What happened between a and b (WAL to lsn_done, the moment the drain finished)."""
    row = conn.execute("SELECT pg_wal_lsn_diff(%s, %s)::bigint AS d", (lsn_done, a.lsn)).fetchone()
    assert row is not None
    db = {k: b.db[k] - a.db[k] for k in a.db}
    db["xact_commit"] -= polls  # the profiler's own status polls
    tables = {}
    for rel, after in b.tables.items():
        before = a.tables.get(rel, {})
        d = {k: v - before.get(k, 0) for k, v in after.items()}
        if any(d.values()):
            tables[rel] = d
    functions: dict[str, dict[str, float]] = {}
    for f, f_after in b.functions.items():
        f_before = a.functions.get(f, {"calls": 0.0, "self_ms": 0.0, "total_ms": 0.0})
        fd = {k: v - f_before[k] for k, v in f_after.items()}
        if fd["calls"]:
            functions[f] = fd
    c = Cost(label, n, seconds, int(row["d"]), {k: b.wal[k] - a.wal[k] for k in a.wal},
             db, tables, functions)
    count_statements(c, log, a.log_at, b.log_at, dbname, skip_pids)
    return c


def count_statements(c: Cost, log: Path, start: int, end: int, dbname: str,
                     skip_pids: set[int]) -> None:
    """Top-level statements of `dbname` in the log between two offsets, by their first words."""
    with log.open("rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8", "replace")
    entries: list[list[str]] = []
    for line in text.splitlines():
        m = ENTRY.match(line)
        if m:
            entries.append([m.group(1), m.group(2), m.group(3)])
        elif entries:
            entries[-1][2] += "\n" + line.strip()
    for pid, db, rest in entries:
        if db != dbname or int(pid) in skip_pids:
            continue
        first, _, more = rest.partition("\n")
        m = DURATION.search(first)
        if not m:
            continue
        lines = [m.group(3), *more.split("\n")]
        key = " ".join(x for x in lines if x and not x.startswith("--"))
        key = re.sub(r"\s+", " ", key).strip()
        key = re.sub(r"\$\d+|'[^']*'|\b\d+\b", "?", key)[:90]
        c.statements[key] += 1
        c.statement_ms[key] += float(m.group(1))


def server_cpu(postmaster: int) -> float:
    """CPU seconds (user + system) of the postmaster and its children so far (a backend that
    exited in between takes its own with it: the drain's backends all live to the end)."""
    total = 0.0
    root = psutil.Process(postmaster)
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def procs_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) of these processes and their children so far."""
    total = 0.0
    for pid in pids:
        with_children = psutil.Process(pid)
        for proc in [with_children, *with_children.children(recursive=True)]:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
    return total


def postmaster_pid(conn: psycopg.Connection[dict[str, Any]]) -> int:
    """The server's postmaster (the first line of postmaster.pid)."""
    row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    return int((Path(row["data_directory"]) / "postmaster.pid").read_text().split()[0])


def floor_drain(url: str, bid: uuid.UUID, ready: Any, go: Any, out: Any, release: Any) -> None:
    """bench.floor's draining process, that also says the CPU it used while draining, and
    keeps its connection (its backend's CPU counted) until released."""
    import psycopg as pg

    done = 0
    with pg.connect(url, autocommit=True) as conn:
        ready.set()
        go.wait()
        cpu0 = time.process_time()
        while True:
            token = uuid.uuid4()
            ids = [r[0] for r in conn.execute(floor.CLAIM, {"bid": bid, "limit": floor.BATCH,
                                                            "token": token}).fetchall()]
            if not ids:
                break
            conn.execute(floor.DONE, {"bid": bid, "ids": ids})
            done += len(ids)
        out.put((done, time.process_time() - cpu0))
        release.wait(120)


def waldump(conn: psycopg.Connection[dict[str, Any]], start: str, end: str) -> list[
        tuple[str, int, int]]:
    """WAL record types between two LSNs (pg_waldump --stats=record): (type, count, bytes)."""
    from pgserver import _commands

    row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    done = subprocess.run(
        [str(Path(_commands.POSTGRES_BIN_PATH) / "pg_waldump"), "--stats=record",
         "-p", str(Path(row["data_directory"]) / "pg_wal"), "-s", start, "-e", end],
        capture_output=True, text=True, check=False, timeout=300)
    out = []
    for line in done.stdout.splitlines():
        m = re.match(r"^(\S+/\S+)\s+(\d+)\s+\(\s*[\d.]+\)\s+\d+\s+\(\s*[\d.]+\)\s+\d+\s+"
                     r"\(\s*[\d.]+\)\s+(\d+)", line)
        if m:
            out.append((m.group(1), int(m.group(2)), int(m.group(3))))
    if not out:
        out.append((f"(pg_waldump said: {done.stderr.strip()[:200]})", 0, 0))
    return sorted(out, key=lambda r: -r[1])


def setup_server(url: str) -> Path:
    """Count function calls, prefix the log with pid and database; return the log's path."""
    with common.connect(url) as conn:
        conn.execute("ALTER SYSTEM SET track_functions = 'all'")
        conn.execute(f"ALTER SYSTEM SET log_line_prefix = '{LOG_PREFIX}'")
        conn.execute("SELECT pg_reload_conf()")
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    time.sleep(0.5)
    return Path(row["data_directory"]) / "log"


def log_everything(url: str) -> str:
    """Log every statement of this database's new sessions; return its name."""
    name = str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])
    with common.connect(url) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET log_min_duration_statement = 0')
    return name


def settle(conn: psycopg.Connection[dict[str, Any]]) -> None:
    """Let backends flush their statistics (they do at most once a second when idle)."""
    time.sleep(1.5)
    conn.execute("SELECT pg_stat_clear_snapshot()")


def run_pgcast(url: str, n: int, log: Path, concurrency: int = 2) -> Cost:
    """Seed n contacts, 2 workers (`concurrency` loops each), one broadcast: counters around
    send + drain."""
    common.seed_contacts(url, n)
    dbname = log_everything(url)
    with common.connect(url) as conn:
        me = {int(conn.execute("SELECT pg_backend_pid() AS p").fetchone()["p"])}  # type: ignore[index]
        bid = common.new_draft(conn)
        postmaster = postmaster_pid(conn)
        with common.Workers(url, 2, ["--concurrency", str(concurrency)]) as workers:
            pids = [p.pid for p in workers.procs]
            conn.execute("CHECKPOINT")
            settle(conn)
            a = snap(conn, log)
            t0 = time.perf_counter()
            sent, send_s = common.send(conn, bid)
            # this backend's WAL counters reach pg_stat_wal when it reports, forced here
            conn.execute("SELECT pg_stat_force_next_flush()")
            conn.execute("SELECT 1")
            conn.execute("SELECT pg_stat_clear_snapshot()")
            after_send = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint AS d, "
                "(SELECT wal_records FROM pg_stat_wal) AS r, "
                "pg_current_wal_lsn()::text AS l", (a.lsn,)).fetchone()
            srv0, cli0 = server_cpu(postmaster), procs_cpu(pids)
            polls = 0
            while True:
                row = conn.execute("SELECT status FROM broadcasts WHERE id = %s",
                                   (bid,)).fetchone()
                polls += 1
                if row is not None and row["status"] in ("sent", "failed", "cancelled"):
                    break
                time.sleep(common.POLL)
            seconds = time.perf_counter() - t0
            done = conn.execute("SELECT pg_current_wal_lsn()::text AS l").fetchone()
            srv1, cli1 = server_cpu(postmaster), procs_cpu(pids)
            assert row is not None and row["status"] == "sent" and sent == n, row
            assert after_send is not None and done is not None
            records = waldump(conn, after_send["l"], done["l"])
            assert done is not None
            settle(conn)
            b = snap(conn, log)
        c = cost(conn, "pgcast", n, seconds, a, b, done["l"], polls, log, dbname, me)
        assert after_send is not None
        c.send_wal_bytes, c.send_s = int(after_send["d"]), send_s
        c.send_wal_records = int(after_send["r"]) - a.wal["wal_records"]
        c.server_cpu, c.client_cpu = srv1 - srv0, cli1 - cli0
        c.records = records
        return c


def run_floor(url: str, n: int, log: Path) -> Cost:
    """bench.floor's queue, filled and analyzed, drained by its two processes."""
    bid = uuid.uuid4()
    dbname = log_everything(url)
    with common.connect(url) as conn:
        me = {int(conn.execute("SELECT pg_backend_pid() AS p").fetchone()["p"])}  # type: ignore[index]
        conn.execute(floor.CREATE)
        conn.execute(floor.FILL, {"bid": bid, "n": n})
        conn.execute("VACUUM ANALYZE floor_queue")
        ctx = mp.get_context("spawn")
        go, out, release = ctx.Event(), ctx.Queue(), ctx.Event()
        readies = [ctx.Event() for _ in range(floor.PROCESSES)]
        procs = [ctx.Process(target=floor_drain, args=(url, bid, r, go, out, release))
                 for r in readies]
        postmaster = postmaster_pid(conn)
        for p in procs:
            p.start()
        try:
            for r in readies:
                r.wait(60)
            conn.execute("CHECKPOINT")
            settle(conn)
            a = snap(conn, log)
            srv0 = server_cpu(postmaster)
            t0 = time.perf_counter()
            go.set()
            outs = [out.get(timeout=3600) for _ in procs]
            seconds = time.perf_counter() - t0
            done = conn.execute("SELECT pg_current_wal_lsn()::text AS l").fetchone()
            srv1 = server_cpu(postmaster)
            release.set()
            drained = sum(d for d, _ in outs)
            assert done is not None
            records = waldump(conn, a.lsn, done["l"])
        finally:
            release.set()
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        assert drained == n and done is not None
        settle(conn)
        b = snap(conn, log)
        c = cost(conn, "floor", n, seconds, a, b, done["l"], 0, log, dbname, me)
        c.server_cpu, c.client_cpu = srv1 - srv0, sum(cpu for _, cpu in outs)
        c.records = records
        return c


def show(c: Cost, top: int) -> None:
    """Print one drain's figures."""
    n = c.recipients
    st = sum(c.statements.values())
    ms = sum(c.statement_ms.values()) or 1.0
    print(f"== {c.label}: {n:,} recipients in {c.seconds:.1f}s ({n / c.seconds:,.0f}/s, every "
          f"statement logged)")
    print(f"   WAL {c.wal_bytes:,} bytes = {c.per(c.wal_bytes):,.0f} bytes/recipient; "
          f"{c.per(c.wal['wal_records']):.2f} records/recipient; full-page images "
          f"{c.per(c.wal['wal_fpi']):.3f}/recipient")
    if c.send_wal_bytes:
        print(f"   of which the send (snapshot, {c.send_s:.1f}s) {c.per(c.send_wal_bytes):,.0f} "
              f"bytes and {c.per(c.send_wal_records):.2f} records/recipient, the drain after it "
              f"{c.per(c.wal_bytes - c.send_wal_bytes):,.0f} bytes and "
              f"{c.per(c.wal['wal_records'] - c.send_wal_records):.2f} records/recipient")
    if c.records:
        print("   WAL record types of the drain (pg_waldump --stats=record), per recipient: "
              + "; ".join(f"{name} {c.per(k):.2f} ({c.per(b):.0f} B)"
                          for name, k, b in c.records[:8]))
    print(f"   CPU: server processes {c.server_cpu:.1f}s = {c.server_cpu * 1e6 / n:.1f} "
          f"µs/recipient, draining processes {c.client_cpu:.1f}s = "
          f"{c.client_cpu * 1e6 / n:.1f} µs/recipient")
    print(f"   top-level statements {st:,} = {c.per(st):.4f}/recipient; transactions "
          f"{c.db['xact_commit']:,} = {c.per(c.db['xact_commit']):.4f}/recipient "
          f"(rollbacks {c.db['xact_rollback']:,}, deadlocks {c.db['deadlocks']:,}); server "
          f"time in statements "
          f"{ms / 1000:.1f}s = {ms * 1000 / n:.1f} µs/recipient")
    print(f"   rows per recipient: inserted {c.per(c.db['tup_inserted']):.2f}, updated "
          f"{c.per(c.db['tup_updated']):.2f}, deleted {c.per(c.db['tup_deleted']):.2f}")
    for rel, d in sorted(c.tables.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"     {rel:28} ins {c.per(d['n_tup_ins']):7.3f}  upd {c.per(d['n_tup_upd']):7.3f}"
              f" (HOT {c.per(d['n_tup_hot_upd']):6.3f})  del {c.per(d['n_tup_del']):7.3f}")
    if c.functions:
        print("   plpgsql/sql function calls (track_functions = all), per recipient, self ms:")
        for f, fd in sorted(c.functions.items(), key=lambda kv: -kv[1]["self_ms"])[:top]:
            print(f"     {f:40} {c.per(fd['calls']):8.4f}/recipient  self {fd['self_ms']:8.0f} "
                  f"ms  total {fd['total_ms']:8.0f} ms")
    print("   statements by count (per recipient, share of count, share of server time):")
    for key, k in c.statements.most_common(top):
        print(f"     {c.per(k):8.4f}  {100 * k / st:5.1f}%  {100 * c.statement_ms[key] / ms:5.1f}%"
              f"  {key}")


def main(argv: list[str] | None = None) -> None:
    """Floor then pgcast on one fresh embedded server; print both and their ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipients", type=int, default=200_000)
    p.add_argument("--top", type=int, default=15, help="statements and functions to list")
    p.add_argument("--concurrency", type=int, default=2,
                   help="dispatch loops per worker (default 2, as every earlier figure; the "
                        "worker's own default is 4)")
    args = p.parse_args(argv)
    from pgcast.sql import embedded

    print(f"cpus {os.cpu_count()}, load average at start "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    base = Path(tempfile.mkdtemp(prefix="pgcast-profile-db-"))
    os.chmod(base, 0o755)
    try:
        srv = embedded.start(base)
        log = setup_server(srv)
        with common.database(srv, "profile_floor") as fl:
            floor_cost = run_floor(fl, args.recipients, log)
        with common.database(srv, "profile_pgcast") as pg:
            pgcast_cost = run_pgcast(pg, args.recipients, log, args.concurrency)
    finally:
        embedded.discard(base, mode="fast")
        shutil.rmtree(base, ignore_errors=True)
    for c in (floor_cost, pgcast_cost):
        show(c, args.top)
    f, g = floor_cost, pgcast_cost
    print("== pgcast / floor, same server, same run:")
    print(f"   rate {g.recipients / g.seconds / (f.recipients / f.seconds):.2f}x; WAL bytes "
          f"{g.wal_bytes / f.wal_bytes:.2f}x; WAL records "
          f"{g.wal['wal_records'] / f.wal['wal_records']:.2f}x; top-level statements "
          f"{sum(g.statements.values()) / max(1, sum(f.statements.values())):.2f}x; rows "
          f"updated {g.db['tup_updated'] / max(1, f.db['tup_updated']):.2f}x; server CPU "
          f"{g.server_cpu / max(f.server_cpu, 1e-9):.2f}x; draining processes' CPU "
          f"{g.client_cpu / max(f.client_cpu, 1e-9):.2f}x")
    print(f"   drain only (send excluded): WAL bytes "
          f"{(g.wal_bytes - g.send_wal_bytes) / f.wal_bytes:.2f}x; WAL records "
          f"{(g.wal['wal_records'] - g.send_wal_records) / f.wal['wal_records']:.2f}x")
    print("load average at end " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    extra = [] if args.concurrency == 2 else ["--concurrency", str(args.concurrency)]
    print("reproduce: " + common.command("profile_db", "--recipients", str(args.recipients),
                                         *extra))


if __name__ == "__main__":
    main()
