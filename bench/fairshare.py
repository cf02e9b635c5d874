"""Fair-share bench (issue 19): broadcasts of several accounts under one global limit.

Each case starts from a fresh database, starts two `pgcast worker` processes (default flags,
null provider), sets the global rate as `pgcast rate set 100` does, sends, and measures from
the recipients' sent_at (the database's clock throughout):

    small-vs-big  A sends 20,000; 2 s later B sends 100: B's drain time against its fair-share
                  time (100 / (limit / 2)) and the total delivered rate meanwhile
    ten-small     BIG sends 50,000; 2 s later S0..S9 send 200 each (fair share 200 / (limit / 11))
    priority      one account, three broadcasts of 4,000 sent at once, one with priority 3
    weight        W, X, Y send 4,000 each at once; `pgcast rate weight W 3` first

    python -m bench.fairshare                      # every case, embedded Postgres
    python -m bench.fairshare --case small-vs-big --case weight
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench import common
from pgcast.sql import broadcasts
from pgcast.sql.queries import QUERIES
from pgcast.worker import main as worker_main

LIMIT = 100.0  # emails/s: the global rate of every case
WORKERS = 2  # processes
LEAD = 2.0  # seconds the big broadcast drains alone before the small ones are sent
TAIL = 3.0  # seconds after the small broadcast finished still counted in the total rate
RECORD_LAG = 1.0  # seconds: a row's sent_at may be committed this long after it is stamped
CAP = 150.0  # seconds: a small broadcast not finished by then is reported as not finished
WINDOW_START = 3.0  # seconds after the sends: the rates of priority and weight are measured
WINDOW = 20.0  # seconds from WINDOW_START
AIM_RATIO = 2.0  # a small broadcast's drain time / its fair-share time, at most
AIM_TOTAL = 0.95  # delivered rate / limit, at least
AIM_WEIGHT = 3.0  # priority 3 / priority 1, and weight 3 / weight 1: about this

Conn = psycopg.Connection[dict[str, Any]]


@dataclass
class Row:
    """One line of the table."""

    case: str
    label: str
    value: str
    aim: str = ""
    verdict: str = ""  # pass, MISS, or "" (informational)

    def markdown(self) -> str:
        """A markdown table row."""
        return f"| {self.case} | {self.label} | {self.value} | {self.aim or '—'} | " \
               f"{self.verdict or '—'} |"


@dataclass
class Case:
    """One case's database, workers and broadcasts; cancels what still sends at the end."""

    name: str
    url: str
    conn: Conn
    sent: list[tuple[str, uuid.UUID]] = field(default_factory=list)  # (account, id)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, label: str, value: str, aim: str = "", verdict: str = "") -> None:
        """Add a figure and print it at once."""
        self.rows.append(Row(self.name, label, value, aim, verdict))
        print(f"  {label}: {value}" + (f"  (aim {aim}: {verdict})" if aim else ""), flush=True)

    def note(self, text: str) -> None:
        """Add and print a remark."""
        self.notes.append(text)
        print(f"  {text}", flush=True)


@contextlib.contextmanager
def running(server_url: str, name: str) -> Iterator[Case]:
    """A fresh database with two workers at the global limit; cancels and stops in the end."""
    with common.database(server_url, name.replace("-", "_")) as url, \
            common.connect(url) as conn:
        workers = common.Workers(url, count=WORKERS, args=[])
        case = Case(name, url, conn)
        try:
            workers.start()
            # the workers apply PGCAST_RATE=0 when they start: the operator's rate comes after
            conn.execute(QUERIES["rate_set"], {"name": "global", "rate": LIMIT,
                                               "burst": worker_main.default_burst(LIMIT)})
            yield case
        finally:
            try:
                for account, bid in case.sent:
                    broadcasts.cancel(conn, account, bid)
            finally:
                workers.stop()


# -- data and clocks ---------------------------------------------------------------------------


def seed(conn: Conn, accounts: dict[str, int]) -> None:
    """n subscribed contacts per account, then the statistics they would have by send time."""
    for account, n in accounts.items():
        conn.execute("INSERT INTO contacts (account, email) SELECT %(a)s, "
                     "'r' || g || '@' || lower(%(a)s) || '.example' "
                     "FROM generate_series(1, %(n)s) g", {"a": account, "n": n})
    conn.execute("VACUUM ANALYZE contacts")


def draft(case: Case, account: str, priority: int = 1) -> uuid.UUID:
    """A draft of `account` (priority set on the draft: the column exists on main)."""
    row = broadcasts.create(case.conn, account, subject=f"Bench {account}",
                            from_address="bench@example.com", text="Hello, this is a benchmark.")
    bid = uuid.UUID(str(row["id"]))
    if priority != 1:
        case.conn.execute("UPDATE broadcasts SET priority = %s WHERE id = %s", (priority, bid))
    return bid


def send(case: Case, drafts: list[tuple[str, uuid.UUID]]) -> float:
    """Send drafts in one transaction (they start at one moment); return that moment."""
    with case.conn.transaction():
        for account, bid in drafts:
            result = broadcasts.send(case.conn, account, bid)
            assert result["success"], result
    case.sent.extend(drafts)
    return started_at(case.conn, drafts[0][1])


def started_at(conn: Conn, bid: uuid.UUID) -> float:
    """When a broadcast was sent, epoch seconds."""
    row = conn.execute("SELECT extract(epoch FROM started_at)::float8 AS t FROM broadcasts "
                       "WHERE id = %s", (bid,)).fetchone()
    assert row is not None and row["t"] is not None
    return float(row["t"])


def now(conn: Conn) -> float:
    """The database's clock, epoch seconds."""
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8 AS t").fetchone()
    assert row is not None
    return float(row["t"])


def sleep_until(conn: Conn, moment: float) -> None:
    """Wait until the database's clock reads `moment` (a planned delay, not a synchronisation)."""
    while (left := moment - now(conn)) > 0:
        time.sleep(min(left, 0.5))


def wait_for(conn: Conn, done: Callable[[], bool], until: float) -> bool:
    """Poll `done` until it holds or the database's clock passes `until`."""
    while not done():
        if now(conn) >= until:
            return False
        time.sleep(0.1)
    return True


def sent_times(conn: Conn, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[float]]:
    """Each broadcast's sent_at, sorted, epoch seconds."""
    out: dict[uuid.UUID, list[float]] = {bid: [] for bid in ids}
    for r in conn.execute("SELECT broadcast_id, extract(epoch FROM sent_at)::float8 AS t "
                          "FROM broadcast_recipients WHERE broadcast_id = ANY(%s) "
                          "AND status = 'sent' ORDER BY sent_at", (ids,)):
        out[r["broadcast_id"]].append(float(r["t"]))
    return out


def is_finished(conn: Conn, bid: uuid.UUID) -> bool:
    """Whether a broadcast has no recipient left to send (status sent)."""
    row = conn.execute("SELECT status FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    return row is not None and row["status"] == "sent"


def count_in(times: list[float], lo: float, hi: float) -> int:
    """Timestamps in [lo, hi)."""
    return sum(1 for t in times if lo <= t < hi)


def shares(case: Case, names: dict[uuid.UUID, str]) -> None:
    """Each sending broadcast's share_per_second from broadcast_progress, or — without it."""
    has = case.conn.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_name = 'broadcast_progress' "
        "AND column_name = 'share_per_second'").fetchone()
    if not has:
        case.row("share_per_second (broadcast_progress)", "—")
        return
    got = {r["broadcast_id"]: r["share_per_second"] for r in case.conn.execute(
        "SELECT broadcast_id, share_per_second FROM broadcast_progress "
        "WHERE broadcast_id = ANY(%s) AND status = 'sending'", (list(names),))}
    parts = [f"{names[b]} {float(got[b]):.1f}" if got.get(b) is not None else f"{names[b]} —"
             for b in names if b in got]
    case.row("share_per_second (broadcast_progress), /s", ", ".join(parts) or "none sending")


def verdict(ok: bool) -> str:
    """pass or MISS."""
    return "pass" if ok else "MISS"


# -- the cases -------------------------------------------------------------------------------


def small_vs_big(case: Case) -> None:
    """A drains 20,000; B sends 100 two seconds later."""
    seed(case.conn, {"A": 20_000, "B": 100})
    a, b = draft(case, "A"), draft(case, "B")
    t_a = send(case, [("A", a)])
    sleep_until(case.conn, t_a + LEAD)
    t_b = send(case, [("B", b)])
    sleep_until(case.conn, t_b + 1.0)
    shares(case, {a: "A", b: "B"})
    finished = wait_for(case.conn, lambda: is_finished(case.conn, b), t_b + CAP)
    fair = 100 / (LIMIT / 2)
    if not finished:
        n = len(sent_times(case.conn, [b])[b])
        case.row("B (100): send to last sent_at", f"not finished, {n} of 100 sent after "
                 f"{CAP:g} s", f"≤ {AIM_RATIO:g} × {fair:g} s", "MISS")
        end = t_b + CAP
    else:
        last = sent_times(case.conn, [b])[b][-1]
        took = last - t_b
        case.row("B (100): send to last sent_at", f"{took:.2f} s (fair share {fair:g} s, "
                 f"{took / fair:.2f}×; B's rate {100 / took:.1f}/s)",
                 f"≤ {AIM_RATIO:g}×", verdict(took / fair <= AIM_RATIO))
        end = last + TAIL
    sleep_until(case.conn, end + RECORD_LAG)
    times = sent_times(case.conn, [a, b])
    everything = sorted(times[a] + times[b])
    bins = [count_in(everything, t_b + k, t_b + k + 1) for k in range(math.floor(end - t_b))]
    low, mean = min(bins) / LIMIT, statistics.fmean(bins) / LIMIT
    case.row(f"total delivered per 1-s bin, B's send to B's end + {TAIL:g} s "
             f"({len(bins)} bins): min / mean, × limit", f"{low:.2f} / {mean:.2f}",
             f"≥ {AIM_TOTAL:g}", verdict(low >= AIM_TOTAL))
    during = count_in(times[a], t_b, end)
    case.row("A's rate over the same period", f"{during / (end - t_b):.1f}/s")


def ten_small(case: Case) -> None:
    """BIG drains 50,000; S0..S9 send 200 each two seconds later."""
    smalls = [f"S{i}" for i in range(10)]
    seed(case.conn, {"BIG": 50_000, **{s: 200 for s in smalls}})
    big = draft(case, "BIG")
    ids = {s: draft(case, s) for s in smalls}
    t_big = send(case, [("BIG", big)])
    sleep_until(case.conn, t_big + LEAD)
    t0 = send(case, [(s, ids[s]) for s in smalls])
    fair = 200 / (LIMIT / 11)
    sleep_until(case.conn, t0 + fair / 2)
    shares(case, {big: "BIG", **{bid: s for s, bid in ids.items()}})
    wait_for(case.conn, lambda: all(is_finished(case.conn, b) for b in ids.values()), t0 + CAP)
    done = {s for s, b in ids.items() if is_finished(case.conn, b)}
    sleep_until(case.conn, min(now(case.conn), t0 + CAP) + RECORD_LAG)
    times = sent_times(case.conn, [big, *ids.values()])
    took = {s: times[ids[s]][-1] - t0 for s in done}
    # the period: until the last small one finished, else until the cap
    end = t0 + max(took.values()) if len(done) == len(ids) else t0 + CAP
    if took:
        spans = sorted(took.values())
        case.row(f"finished small ones ({len(done)} of 10): send to last sent_at, "
                 "min / median / max", f"{spans[0]:.1f} / {statistics.median(spans):.1f} / "
                 f"{spans[-1]:.1f} s (fair share {fair:.0f} s)")
    for s in smalls:
        if s not in done:
            case.note(f"{s}: not finished, {len(times[ids[s]])} of 200 sent after {CAP:g} s")
    worst = max(took.values()) / fair if len(done) == len(ids) else math.inf
    value = f"{worst:.1f}×" if math.isfinite(worst) else \
        f"> {CAP / fair:.1f}× ({len(ids) - len(done)} not finished after {CAP:g} s)"
    case.row("max (small drain time / fair-share time)", value, f"≤ {AIM_RATIO:g}×",
             verdict(worst <= AIM_RATIO))
    everything = sorted(t for ts in times.values() for t in ts)
    period = end - t0
    total = count_in(everything, t0, end)
    small_sent = sum(count_in(times[b], t0, end) for b in ids.values())
    case.row(f"total delivered rate over those {period:.0f} s, × limit",
             f"{total / period / LIMIT:.2f} (BIG {(total - small_sent) / period:.1f}/s, "
             f"the ten small {small_sent / period:.1f}/s)", f"≥ {AIM_TOTAL:g}",
             verdict(total / period / LIMIT >= AIM_TOTAL))


def window_rates(case: Case, names: dict[uuid.UUID, str], t0: float) -> dict[str, float]:
    """Each broadcast's sends per second in [t0 + WINDOW_START, + WINDOW); shares midway."""
    lo, hi = t0 + WINDOW_START, t0 + WINDOW_START + WINDOW
    sleep_until(case.conn, (lo + hi) / 2)
    shares(case, names)
    sleep_until(case.conn, hi + RECORD_LAG)
    times = sent_times(case.conn, list(names))
    rates = {names[b]: count_in(ts, lo, hi) / WINDOW for b, ts in times.items()}
    case.row(f"rates over {WINDOW_START:g}–{WINDOW_START + WINDOW:g} s after the sends, /s",
             ", ".join(f"{n} {r:.1f}" for n, r in rates.items())
             + f" (total {sum(rates.values()) / LIMIT:.2f} × limit)")
    return rates


def priority(case: Case) -> None:
    """One account, three broadcasts of 4,000 at once, one of them with priority 3."""
    seed(case.conn, {"P": 4_000})
    ids = {"p3": draft(case, "P", priority=3), "p1a": draft(case, "P"),
           "p1b": draft(case, "P")}
    t0 = send(case, [("P", bid) for bid in ids.values()])
    rates = window_rates(case, {bid: n for n, bid in ids.items()}, t0)
    ratio = rates["p3"] / statistics.fmean([rates["p1a"], rates["p1b"]])
    case.row("priority 3 / mean of the two priority 1", f"{ratio:.2f}×",
             f"about {AIM_WEIGHT:g}×", verdict(abs(ratio - AIM_WEIGHT) <= 0.5))


def weight(case: Case) -> None:
    """W, X, Y send 4,000 each at once; the operator gave W weight 3."""
    seed(case.conn, {"W": 4_000, "X": 4_000, "Y": 4_000})
    done = subprocess.run([sys.executable, "-m", "pgcast.bin.cli", "rate", "weight", "W", "3"],
                          cwd=common.ROOT, env=common.child_env(case.url), capture_output=True,
                          text=True, timeout=60)
    if done.returncode not in (0, 2):
        raise RuntimeError(f"pgcast rate weight W 3 exited {done.returncode}: {done.stderr}")
    weighted = done.returncode == 0
    if not weighted:
        case.note(f"`pgcast rate weight W 3`: {done.stderr.strip()}")
    ids = {a: draft(case, a) for a in ("W", "X", "Y")}
    t0 = send(case, list(ids.items()))
    rates = window_rates(case, {bid: a for a, bid in ids.items()}, t0)
    if not weighted:
        case.row("W / mean(X, Y)", "n/a (no account weights)")
        return
    ratio = rates["W"] / statistics.fmean([rates["X"], rates["Y"]])
    case.row("W (weight 3) / mean(X, Y)", f"{ratio:.2f}×", f"about {AIM_WEIGHT:g}×",
             verdict(abs(ratio - AIM_WEIGHT) <= 0.5))


CASES: dict[str, Callable[[Case], None]] = {
    "small-vs-big": small_vs_big, "ten-small": ten_small, "priority": priority, "weight": weight}


def main(argv: list[str] | None = None) -> int:
    """Run the cases; print each figure as it comes, then one markdown table."""
    parser = argparse.ArgumentParser(prog="python -m bench.fairshare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=list(CASES),
                        help="run only this case (repeatable; default: all)")
    args = parser.parse_args(argv)
    names = args.case or list(CASES)
    print(f"limit {LIMIT:g}/s (burst {worker_main.default_burst(LIMIT):g}), {WORKERS} worker "
          f"processes with default flags, null provider; cpus {os.cpu_count()}, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows: list[Row] = []
    notes: list[str] = []
    with common.server() as server_url:
        for name in names:
            print(f"{name}:", flush=True)
            t = time.monotonic()
            with running(server_url, name) as case:
                CASES[name](case)
            rows += case.rows
            notes += [f"{name}: {n}" for n in case.notes]
            print(f"  ({time.monotonic() - t:.0f} s, load "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})", flush=True)
    print("\n| case | figure | value | aim | result |\n|---|---|---|---|---|")
    for r in rows:
        print(r.markdown())
    for n in notes:
        print(f"- {n}")
    print(f"reproduce: {common.command('fairshare', *[a for n in names for a in ('--case', n)])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
