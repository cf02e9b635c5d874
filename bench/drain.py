"""pgcast drain: N recipients, null provider, unlimited rate, 2 workers; recipients/s and RSS."""

from __future__ import annotations

import argparse
import collections
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common

WORKERS = 2
CONCURRENCY = 2  # dispatch loops per worker process
SAMPLE_EVERY = 0.1  # seconds between pg_stat_activity samples with --profile


@dataclass
class Drain:
    """One broadcast, from send to `sent`."""

    recipients: int
    send_s: float  # the snapshot (send) statement
    drain_s: float  # send committed -> status sent
    peak_rss: list[int]  # bytes, per worker process
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s after send, sent)
    waits: collections.Counter[str] = field(default_factory=collections.Counter)
    maintenance: list[str] = field(default_factory=list)  # autovacuum/analyze seen, with time

    @property
    def rate(self) -> float:
        """Recipients/s from send committed to `sent`."""
        return self.recipients / self.drain_s

    @property
    def rate_with_send(self) -> float:
        """Recipients/s from the send call to `sent`, snapshot included."""
        return self.recipients / (self.send_s + self.drain_s)


class Profiler:
    """Samples progress, active backends' wait events and autovacuum runs during a drain."""

    def __init__(self, url: str, bid: uuid.UUID, t0: float) -> None:
        self.url, self.bid, self.t0 = url, bid, t0
        self.timeline: list[tuple[float, int]] = []
        self.waits: collections.Counter[str] = collections.Counter()
        self.maintenance: list[str] = []
        self._seen: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Profiler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with common.connect(self.url) as conn:
            self._maintenance(conn, first=True)
            last_tick = 0.0
            while not self._stop.wait(SAMPLE_EVERY):
                now = time.perf_counter() - self.t0
                for r in conn.execute(
                        "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w, "
                        "       left(regexp_replace(query, '\\s+', ' ', 'g'), 40) AS q "
                        "FROM pg_stat_activity WHERE datname = current_database() "
                        "AND state = 'active' AND pid <> pg_backend_pid()"):
                    self.waits[f"{r['w']} | {r['q']}"] += 1
                if now - last_tick >= 1.0:
                    last_tick = now
                    row = conn.execute("SELECT sent FROM broadcasts WHERE id = %s",
                                       (self.bid,)).fetchone()
                    self.timeline.append((now, int(row["sent"]) if row else 0))
                    self._maintenance(conn)

    def _maintenance(self, conn: Any, first: bool = False) -> None:
        # over every broadcast's partition of broadcast_recipients
        row = conn.execute(
            "SELECT sum(autovacuum_count) AS autovacuum_count, "
            "       sum(autoanalyze_count) AS autoanalyze_count, "
            "       sum(n_live_tup) AS n_live_tup, sum(n_dead_tup) AS n_dead_tup, "
            "       sum(pg_relation_size(relid)) AS heap "
            "FROM pg_stat_user_tables WHERE relid IN (SELECT inhrelid FROM pg_inherits "
            "  WHERE inhparent = 'broadcast_recipients'::regclass)").fetchone()
        if row is None or row["heap"] is None:
            return
        now = time.perf_counter() - self.t0
        for key in ("autovacuum_count", "autoanalyze_count"):
            if not first and row[key] != self._seen.get(key):
                self.maintenance.append(f"{key.split('_')[0]} finished by {now:.0f}s "
                                        f"(dead {row['n_dead_tup']:,}, heap "
                                        f"{row['heap'] / 2**20:.0f} MB)")
            self._seen[key] = row[key]


def drain_one(url: str, workers: common.Workers, *, tag: str | None = None,
              profile: bool = False, after_send: str | None = None,
              template: str = "plain") -> Drain:
    """Send one draft to the running workers and time it to `sent`."""
    with common.connect(url) as conn:
        bid = common.new_draft(conn, tag, template)
        with common.RssSampler([p.pid for p in workers.procs]) as rss:
            t0 = time.perf_counter()
            n, send_s = common.send(conn, bid)
            t_sent = time.perf_counter()
            if after_send:  # an experiment; its time counts in the drain
                conn.execute(after_send)
            if profile:
                with Profiler(url, bid, t_sent) as prof:
                    status = common.wait_status(conn, bid)
            else:
                status = common.wait_status(conn, bid)
            t_done = time.perf_counter()
        row = conn.execute("SELECT total, sent FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert status == "sent" and row is not None and row["sent"] == row["total"] == n, (status, row)
    del t0
    d = Drain(n, send_s, t_done - t_sent, list(rss.peaks.values()))
    if profile:
        d.timeline, d.waits, d.maintenance = prof.timeline, prof.waits, prof.maintenance
    return d


def run_series(url: str, recipients: int, broadcasts: int = 1, *, seed: bool = True,
               tag: str | None = None, concurrency: int = CONCURRENCY,
               profile: bool = False, after_send: str | None = None,
               worker_args: list[str] | None = None, earlier: int = 0,
               template: str = "plain", module: str = "pgcast.bin.cli") -> list[Drain]:
    """Seed contacts (unless told not to), start 2 workers, drain `broadcasts` in a row.

    earlier: first send and cancel that many small broadcasts of another account, so their
    partitions are there (what a long-lived database looks like to the planner)."""
    if seed:
        common.seed_contacts(url, recipients)
    if earlier:
        add_earlier_broadcasts(url, earlier)
    results = []
    args = ["--concurrency", str(concurrency), *(worker_args or [])]
    with common.Workers(url, WORKERS, args, module=module) as workers:
        for _ in range(broadcasts):
            results.append(drain_one(url, workers, tag=tag, profile=profile,
                                     after_send=after_send, template=template))
    return results


def add_earlier_broadcasts(url: str, n: int, size: int = 10) -> None:
    """n sent-then-cancelled broadcasts of `size` recipients each, one partition apiece."""
    from pgcast.sql import broadcasts

    with common.connect(url) as conn:
        conn.execute("INSERT INTO contacts (account, email) SELECT 'earlier', "
                     "'old' || g || '@example.com' FROM generate_series(1, %s) g", (size,))
        for _ in range(n):
            row = broadcasts.create(conn, "earlier", subject="Old", from_address="o@example.com",
                                    text="old", tag=None)
            assert broadcasts.send(conn, "earlier", row["id"])["success"]
            assert broadcasts.cancel(conn, "earlier", row["id"])["success"]
        # a long-lived database has long since vacuumed the catalog churn of those sends
        # and flushed it: measure the partitions, not the aftermath of creating them
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def figures(results: list[Drain], cmd: str, key: str = "drain") -> list[common.Figure]:
    """The figures of a series: rate of the first, RSS, and later broadcasts vs the first."""
    first = results[0]
    n = first.recipients
    out = [common.Figure(
        key, f"pgcast drain, {n:,} recipients, 2 workers (first broadcast)", first.rate,
        "recipients/s", command=cmd,
        note=(f"send committed -> sent in {first.drain_s:.1f}s; snapshot {first.send_s:.1f}s; "
              f"{first.rate_with_send:,.0f}/s with the snapshot"))]
    out.append(common.Figure(
        f"{key}_rss", f"worker peak RSS during the {n:,} drain", max(first.peak_rss) / 2**20,
        "MB", aim="<= 150 MB", passed=max(first.peak_rss) <= 150 * 2**20, command=cmd,
        note="per worker: " + ", ".join(f"{r / 2**20:.0f} MB" for r in first.peak_rss)))
    for i, r in enumerate(results[1:], start=2):
        out.append(common.Figure(
            f"{key}_{i}", f"pgcast drain, {n:,} recipients, broadcast #{i} on the same table",
            r.rate, "recipients/s", command=cmd,
            note=f"{r.drain_s:.1f}s; snapshot {r.send_s:.1f}s; "
                 f"peak RSS {max(r.peak_rss) / 2**20:.0f} MB"))
    return out


def paired_rounds(url: str, args: argparse.Namespace,
                  worker_args: list[str]) -> list[tuple[Drain, Drain]]:
    """(main's plain renderer, this content) drains back to back, the order alternating."""
    common.seed_contacts(url, args.recipients)
    pairs = []
    for i in range(args.rounds):
        drains: dict[str, Drain] = {}
        order = ["main", "ours"] if i % 2 == 0 else ["ours", "main"]
        for which in order:
            drains[which] = run_series(
                url, args.recipients, 1, seed=False, concurrency=args.concurrency,
                worker_args=worker_args,
                module="bench.main_renderer" if which == "main" else "pgcast.bin.cli",
                template="plain" if which == "main" else args.template)[0]
        pairs.append((drains["main"], drains["ours"]))
    return pairs


def against_main(pairs: list[tuple[Drain, Drain]], cmd: str) -> list[common.Figure]:
    """Both drains' rates and the median of the paired ratios (aim >= 0.5)."""
    n = pairs[0][0].recipients
    mains = [m.rate for m, _ in pairs]
    ours = [o.rate for _, o in pairs]
    ratios = [o / m for m, o in zip(mains, ours, strict=True)]
    ratio = statistics.median(ratios)
    return [
        common.Figure("drain_main", f"pgcast drain, {n:,} recipients, main's plain renderer",
                      statistics.median(mains), "recipients/s", command=cmd,
                      note="median of " + ", ".join(f"{r:,.0f}" for r in mains)),
        common.Figure("drain_content", f"pgcast drain, {n:,} recipients, this content",
                      statistics.median(ours), "recipients/s", command=cmd,
                      note="median of " + ", ".join(f"{r:,.0f}" for r in ours)),
        common.Figure("drain_vs_main", f"{n:,} drain, this content / main's plain renderer",
                      ratio, "x", aim=">= 0.5", passed=ratio >= 0.5, command=cmd,
                      note=f"median of {len(pairs)} paired rounds ("
                           + ", ".join(f"{r:.2f}" for r in ratios) + "); ratio of the medians "
                           f"{statistics.median(ours) / statistics.median(mains):.2f}"),
    ]


def print_profile(results: list[Drain]) -> None:
    """The sampled timeline, wait events and autovacuum runs of each drain."""
    for i, r in enumerate(results, start=1):
        print(f"-- broadcast #{i}: {r.recipients:,} in {r.drain_s:.1f}s")
        prev_t, prev_n = 0.0, 0
        marks = []
        for t, n in r.timeline:
            if t - prev_t >= 5 or (t, n) == r.timeline[-1]:
                marks.append(f"{t:.0f}s:{(n - prev_n) / max(t - prev_t, 1e-9):,.0f}/s")
                prev_t, prev_n = t, n
        print("   rate by window: " + "  ".join(marks))
        for m in r.maintenance:
            print(f"   {m}")
        total = sum(r.waits.values()) or 1
        for what, count in r.waits.most_common(8):
            print(f"   {100 * count / total:5.1f}%  {what}")


def main(argv: list[str] | None = None) -> None:
    """Run the drain benchmark alone on its own database."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipients", type=int, default=200_000)
    p.add_argument("--broadcasts", type=int, default=1, help="consecutive broadcasts to drain")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument("--group-size", type=int, help="worker --group-size (default: the worker's)")
    p.add_argument("--profile", action="store_true",
                   help="sample rate, wait events and autovacuum runs during each drain")
    p.add_argument("--after-send", metavar="SQL",
                   help="experiment: run this right after each send commits (timed with the "
                        "drain), e.g. 'ANALYZE broadcast_recipients'")
    p.add_argument("--earlier", type=int, default=0, metavar="N",
                   help="first send and cancel N small broadcasts (N partitions already there)")
    p.add_argument("--template", choices=sorted(common.TEMPLATES), default="plain",
                   help="the broadcast's content: plain (no merge tag) or merge (three merge "
                        "tags and the unsubscribe link in text and html)")
    p.add_argument("--against-main", action="store_true",
                   help="first drain the same recipients with main's plain renderer "
                        "(bench.main_renderer), then with --template; print the ratio")
    p.add_argument("--rounds", type=int, default=3,
                   help="with --against-main: paired rounds (default 3)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    extra = ["--recipients", str(args.recipients)]
    worker_args = []
    if args.group_size:
        worker_args = ["--group-size", str(args.group_size)]
        extra += worker_args
    if args.after_send:
        extra += ["--after-send", args.after_send]
    if args.broadcasts != 1:
        extra += ["--broadcasts", str(args.broadcasts)]
    if args.concurrency != CONCURRENCY:
        extra += ["--concurrency", str(args.concurrency)]
    if args.earlier:
        extra += ["--earlier", str(args.earlier)]
    if args.template != "plain":
        extra += ["--template", args.template]
    if args.against_main:
        extra += ["--against-main", "--rounds", str(args.rounds)]
    cmd = common.command("drain", *extra)
    if args.against_main:
        with common.bench_db("drain") as url:
            pairs = paired_rounds(url, args, worker_args)
        figs = against_main(pairs, cmd)
        common.report(figs, cmd)
        if args.json:
            common.dump(figs, args.json)
        return
    with common.bench_db("drain") as url:
        results = run_series(url, args.recipients, args.broadcasts,
                             concurrency=args.concurrency, profile=args.profile,
                             after_send=args.after_send, worker_args=worker_args,
                             earlier=args.earlier, template=args.template)
    figs = figures(results, cmd)
    common.report(figs, cmd)
    if args.profile:
        print_profile(results)
    if args.json:
        common.dump(figs, args.json)


if __name__ == "__main__":
    main()
