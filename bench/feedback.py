"""One SES webhook call's latency, and its statements, with 10 broadcasts and with 1,000+.

    python -m bench.feedback [--broadcasts 1000] [--rows 1000] [--calls 2000] [--rounds 10]

Fills --broadcasts sending broadcasts of --rows recipient rows each (1,000,000 by default),
one partition each, straight from generate_series, in batches of 50 partitions per
transaction. Each call is a real signed SNS notification (SignatureVersion 2, signed before
the clock starts) through the real app in-process (httpx's ASGI transport: the verifier's
certificate comes through its fetch seam, which no HTTP server would let a bench use), on a
tagged row of a random broadcast: 70 % deliveries, 10 % soft bounces, 10 % hard bounces,
10 % complaints. Calls of the same mix go to a second database that holds the same number
of rows in only 10 broadcasts, in paired rounds back to back (the machine is shared: the
estimator, decided before the run, is the median of the rounds' p50 ratios), and the
statements each call sends are counted at the app's one database door: the call does not
grow with the broadcasts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import unittest.mock
import uuid
from typing import Any

from bench import common
from pgcast.api import db as api_db
from pgcast.api import sns, webhooks
from tests import snsmessages as m
from tests.integration import test_api_helpers as h

ACCOUNT = h.ACCOUNT
BATCH = 50  # partitions per transaction: each takes a few locks, the lock table is bounded
MIX = [("Delivery", 70), ("Transient", 10), ("Permanent", 10), ("Complaint", 10)]


def fill(url: str, first: int, count: int, rows: int) -> dict[uuid.UUID, int]:
    """`count` sending broadcasts of `rows` recipients each, every one on its own slice of
    new contacts; returns each broadcast's lowest contact id."""
    out: dict[uuid.UUID, int] = {}
    with common.connect(url) as conn:
        base = conn.execute("SELECT coalesce(max(id), 0) + 1 AS base FROM contacts").fetchone()
        conn.execute(
            "INSERT INTO contacts (account, email) SELECT %s, 'c' || g || '@example.com' "
            "FROM generate_series(%s::bigint, %s::bigint - 1) g ORDER BY g",
            (ACCOUNT, first * rows, (first + count) * rows))
        lo = int(base["base"])
        for start in range(0, count, BATCH):
            with conn.transaction():
                for k in range(start, min(start + BATCH, count)):
                    out[_broadcast(conn, lo + k * rows, rows)] = lo + k * rows
        conn.execute("VACUUM ANALYZE contacts")
    return out


def _broadcast(conn: Any, lo: int, rows: int) -> uuid.UUID:
    row = conn.execute(
        "INSERT INTO broadcasts (account, status, subject, from_address, text_body, total, sent, "
        "started_at) VALUES (%s, 'sending', 'bench', 'a@example.com', 'x', %s, %s, now()) "
        "RETURNING id", (ACCOUNT, rows, rows)).fetchone()
    bid: uuid.UUID = row["id"]
    part = conn.execute("SELECT pgcast_partition_create_v3(%s) AS name", (bid,)).fetchone()
    conn.execute(
        f"INSERT INTO {part['name']} (broadcast_id, contact_id, email, status, worker, sent_at) "
        "SELECT %s, c.id, c.email, 'sent', 'bench', now() FROM contacts c "
        "WHERE c.id >= %s AND c.id < %s", (bid, lo, lo + rows))
    conn.execute("SELECT pgcast_partition_attach_v2(%s)", (bid,))
    return bid


def messages(lows: dict[uuid.UUID, int], rows: int, calls: int,
             rng: random.Random) -> list[dict[str, Any]]:
    """`calls` signed notifications on random rows of the given broadcasts."""
    kinds = [k for k, w in MIX for _ in range(w)]
    ids = list(lows)
    out = []
    for _ in range(calls):
        bid = rng.choice(ids)
        cid = lows[bid] + rng.randrange(rows)
        kind = rng.choice(kinds)
        ses_kind = kind if kind in ("Delivery", "Complaint") else "Bounce"
        ev = m.ses_event(ses_kind, f"c{cid}@example.com", broadcast=bid, contact=cid,
                         bounce_type=kind if kind in ("Transient", "Permanent") else "Permanent")
        out.append(m.notification(ev, version="2"))
    return out


class Caller:
    """The real app on one database, the test certificate behind its fetch seam."""

    def __init__(self, url: str) -> None:
        self.client = h.client(url)
        self.api = self.client.__enter__()
        # the guard computes on every counted event; limits of 1.0 keep every broadcast
        # sending, so each call costs what a call in the middle of a broadcast costs
        self.api.app.state.feedback = webhooks.Feedback(
            sns.Verifier(frozenset({m.TOPIC}), webhooks.DEFAULT_MAX_AGE, fetch=m.Fetcher()),
            max_bounce_rate=1.0, max_complaint_rate=1.0)
        self.times: list[float] = []
        self.outcomes: dict[str, int] = {}

    def call(self, msg: dict[str, Any], timed: bool = True) -> None:
        """One POST /webhooks/ses."""
        body = json.dumps(msg)
        t0 = time.perf_counter()
        r = self.api.post("/webhooks/ses", content=body,
                          headers={"Content-Type": "text/plain; charset=UTF-8"})
        elapsed = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        if timed:
            self.times.append(elapsed)
            outcome = r.json()["outcome"]
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def close(self) -> None:
        """Stop the app."""
        self.client.__exit__(None, None, None)


def main() -> int:
    """Fill both databases, alternate rounds of calls, print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broadcasts", type=int, default=1000)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--calls", type=int, default=2000, help="timed calls per database")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    cmd = common.command("feedback", *sys.argv[1:])
    rng = random.Random(14)
    statements = 0
    real_one = api_db.one

    async def counted(*a: Any, **kw: Any) -> Any:
        nonlocal statements
        statements += 1
        return await real_one(*a, **kw)

    with common.server() as srv, common.database(srv, "few") as few_url, \
            common.database(srv, "many") as many_url, \
            unittest.mock.patch.object(webhooks.db, "one", counted):
        t0 = time.perf_counter()
        # the same rows in both: only the number of broadcasts (partitions) differs
        few_rows = args.broadcasts * args.rows // 10
        few = fill(few_url, 0, 10, few_rows)
        many = fill(many_url, 0, args.broadcasts, args.rows)
        for url in (few_url, many_url):
            with common.connect(url) as conn:
                conn.execute("VACUUM ANALYZE")
                conn.execute("CHECKPOINT")
        with common.connect(many_url) as conn:
            total = conn.execute("SELECT count(*) AS n FROM broadcast_recipients").fetchone()["n"]
        fill_s = time.perf_counter() - t0
        callers = {"10 broadcasts": (Caller(few_url), few, few_rows),
                   f"{args.broadcasts:,} broadcasts": (Caller(many_url), many, args.rows)}
        ratios = []
        try:
            for caller, lows, rows in callers.values():  # pool, certificate cache, plans
                for msg in messages(lows, rows, 20, rng):
                    caller.call(msg, timed=False)
            statements = 0
            per = max(1, args.calls // args.rounds)
            for _ in range(args.rounds):  # paired rounds, back to back: load hits both
                medians = []
                for caller, lows, rows in callers.values():
                    start = len(caller.times)
                    for msg in messages(lows, rows, per, rng):
                        caller.call(msg)
                    medians.append(common.median(caller.times[start:]))
                ratios.append(medians[1] / medians[0])
        finally:
            for caller, _, _ in callers.values():
                caller.close()
    calls = sum(len(c.times) for c, _, _ in callers.values())
    print(f"POST /webhooks/ses through the app in-process; {args.rounds} paired rounds of {per} "
          f"calls per database; {total:,} recipient rows over {args.broadcasts:,} broadcasts "
          f"vs the same rows over 10 broadcasts (setup {fill_s:.0f} s)")
    print(f"{'with':<20}{'p50 ms':>9}{'p99 ms':>9}  outcomes")
    for label, (c, _, _) in callers.items():
        outcomes = ", ".join(f"{k} {v}" for k, v in c.outcomes.items())
        print(f"{label:<20}{common.percentile(c.times, 50):>9.2f}"
              f"{common.percentile(c.times, 99):>9.2f}  {outcomes}")
    print(f"p50 ratio {args.broadcasts:,} / 10 broadcasts: median of paired rounds "
          f"{common.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"statements per call: {statements / calls:.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    print(f"reproduce: {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
