"""One SES webhook call's latency, and its statements, with 10 broadcasts and with 1,000+.

    python -m bench.feedback [--broadcasts 1000] [--rows 1000] [--calls 2000]

Fills --broadcasts sending broadcasts of --rows recipient rows each (1,000,000 by default),
one partition each, straight from generate_series, in batches of 50 partitions per
transaction. Each call is a real signed SNS notification (SignatureVersion 2, signed before
the clock starts) through the real app in-process (httpx's ASGI transport: the verifier's
certificate comes through its fetch seam, which no HTTP server would let a bench use), on a
tagged row of a random broadcast: 70 % deliveries, 10 % soft bounces, 10 % hard bounces,
10 % complaints. p50/p99 are measured after the first 10 broadcasts exist and again after all
of them, with the statements each call sends (counted at the app's one database door) to
show the call does not grow with the number of broadcasts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import unittest.mock
import uuid
from typing import Any

from api import db as api_db
from api import sns, webhooks
from bench import common
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
    part = conn.execute("SELECT pgcast_partition_create_v2(%s) AS name", (bid,)).fetchone()
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


def measure(url: str, batch: list[dict[str, Any]]) -> dict[str, float]:
    """p50/p99 in ms of one call each, and statements per call."""
    fetcher = m.Fetcher()
    times: list[float] = []
    outcomes: dict[str, int] = {}
    statements = 0
    real_one = api_db.one

    async def counted(*args: Any, **kw: Any) -> Any:
        nonlocal statements
        statements += 1
        return await real_one(*args, **kw)

    with h.client(url) as api, unittest.mock.patch.object(webhooks.db, "one", counted):
        # the guard computes on every counted event; limits of 1.0 keep every broadcast
        # sending, so each call costs what a call in the middle of a broadcast costs
        api.app.state.feedback = webhooks.Feedback(
            sns.Verifier(frozenset({m.TOPIC}), webhooks.DEFAULT_MAX_AGE, fetch=fetcher),
            max_bounce_rate=1.0, max_complaint_rate=1.0)
        hook_headers = {"Content-Type": "text/plain; charset=UTF-8"}
        for warm in batch[:20]:  # pool, certificate cache, plans
            api.post("/webhooks/ses", content=json.dumps(warm), headers=hook_headers)
        statements = 0
        for msg in batch[20:]:
            body = json.dumps(msg)
            t0 = time.perf_counter()
            r = api.post("/webhooks/ses", content=body, headers=hook_headers)
            times.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            outcome = r.json()["outcome"]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    n = len(times)
    return {"p50": common.percentile(times, 50), "p99": common.percentile(times, 99),
            "statements": statements / n, "calls": n, **{f"n_{k}": v
                                                              for k, v in outcomes.items()}}


def main() -> int:
    """Fill, measure at 10 broadcasts and at all of them, print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broadcasts", type=int, default=1000)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    cmd = common.command("feedback", *sys.argv[1:])
    rng = random.Random(14)
    results = {}
    with common.bench_db("feedback") as url:
        t0 = time.perf_counter()
        few = fill(url, 0, 10, args.rows)
        results["10 broadcasts"] = measure(url, messages(few, args.rows, args.calls, rng))
        more = fill(url, 10, args.broadcasts - 10, args.rows)
        with common.connect(url) as conn:
            conn.execute("VACUUM ANALYZE")
            total = conn.execute("SELECT count(*) AS n FROM broadcast_recipients").fetchone()["n"]
        fill_s = time.perf_counter() - t0
        results[f"{args.broadcasts:,} broadcasts"] = measure(
            url, messages({**few, **more}, args.rows, args.calls, rng))
    print(f"POST /webhooks/ses, in-process app, {args.calls - 20} timed calls after 20 "
          f"warm-up calls; {total:,} recipient rows over {args.broadcasts:,} broadcasts "
          f"(setup {fill_s:.0f} s)")
    print(f"{'with':<20}{'p50 ms':>9}{'p99 ms':>9}{'stmts/call':>12}  outcomes")
    for label, f in results.items():
        outcomes = ", ".join(f"{k[2:]} {v}" for k, v in f.items() if k.startswith("n_"))
        print(f"{label:<20}{f['p50']:>9.2f}{f['p99']:>9.2f}{f['statements']:>12.2f}  {outcomes}")
    print(f"reproduce: {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
