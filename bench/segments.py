"""Segments: `segment count` of a five-clause filter over N contacts (p50/p95), the same for
filters no index serves, and a send with the filter against the bare INSERT … SELECT with the
equivalent hand-written WHERE, in paired rounds of the same run."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any

from psycopg import sql as psql

from bench import common
from pgcast.sql import broadcasts, segments
from pgcast.sql.queries import QUERIES

# contacts with plan, country and signup date attributes, a numeric score, tags beta (10%),
# vip (5%), newsletter (50%), created over three years; 5% unsubscribed, 1% suppressed
SEED = """
INSERT INTO contacts (account, email, name, tags, attributes, created_at, unsubscribed_at,
                      suppressed_at, suppressed_reason)
SELECT %(account)s,
       'user' || g || '@' || (ARRAY['example.com', 'mail.test', 'corp.example'])[1 + g %% 3],
       'User ' || g,
       array_remove(ARRAY[CASE WHEN r1 < 0.10 THEN 'beta' END, CASE WHEN r2 < 0.05 THEN 'vip' END,
                          CASE WHEN r3 < 0.50 THEN 'newsletter' END], NULL),
       jsonb_build_object(
           'plan', CASE WHEN r4 < 0.6 THEN 'free' WHEN r4 < 0.8 THEN 'pro'
                        WHEN r4 < 0.9 THEN 'team' ELSE 'enterprise' END,
           'country', (ARRAY['US', 'DE', 'FR', 'GB', 'NL', 'ES', 'IT', 'SE', 'PL', 'BR'])
                      [1 + floor(r5 * 10)::int],
           'signup', to_char(ts, 'YYYY-MM-DD'),
           'score', floor(r6 * 100)::int),
       ts, CASE WHEN r7 < 0.05 THEN now() END, CASE WHEN r8 < 0.01 THEN now() END,
       CASE WHEN r8 < 0.01 THEN 'bounce' END
FROM (SELECT g, random() r1, random() r2, random() r3, random() r4, random() r5, random() r6,
             random() r7, random() r8,
             timestamptz '2022-01-01 00:00+00' + random() * interval '1095 days' AS ts
      FROM generate_series(1, %(n)s) g) s
"""

FIVE = {"all": [{"tag": "beta"},
                {"attribute": "plan", "in": ["pro", "team"]},
                {"not": {"attribute": "country", "eq": "DE"}},
                {"created_after": "2024-01-01"},
                {"attribute": "signup", "prefix": "202"}]}
# the same audience, written by hand
HAND = """
INSERT INTO {table} (broadcast_id, contact_id, email)
SELECT %(bid)s, c.id, c.email FROM contacts c
WHERE c.account = %(account)s AND c.unsubscribed_at IS NULL AND c.suppressed_at IS NULL
  AND c.tags @> ARRAY['beta'] AND c.attributes ->> 'plan' IN ('pro', 'team')
  AND c.attributes ->> 'country' IS DISTINCT FROM 'DE'
  AND c.created_at > timestamptz '2024-01-01 00:00+00'
  AND c.attributes ->> 'signup' LIKE '202%%'
"""
# a broad audience (about a third of the contacts): no index narrows it
BROAD = {"all": [{"not": {"attribute": "country", "eq": "DE"}},
                 {"attribute": "plan", "ne": "free"}]}
HAND_BROAD = """
INSERT INTO {table} (broadcast_id, contact_id, email)
SELECT %(bid)s, c.id, c.email FROM contacts c
WHERE c.account = %(account)s AND c.unsubscribed_at IS NULL AND c.suppressed_at IS NULL
  AND c.attributes ->> 'country' IS DISTINCT FROM 'DE'
  AND c.attributes ->> 'plan' IS DISTINCT FROM 'free'
"""
SENDS = {"five": (FIVE, HAND), "broad": (BROAD, HAND_BROAD)}
# filters whose selective part no index serves (a numeric compare, a prefix, a domain)
UNINDEXED = {
    "score_gt": {"attribute": "score", "gt": 97},
    "plan_prefix": {"all": [{"attribute": "plan", "prefix": "ent"},
                            {"attribute": "country", "ne": "DE"}]},
    "domain": {"email_domain": "corp.example"},
}
PLAIN = "CREATE TABLE seg_plain (LIKE broadcast_recipients INCLUDING DEFAULTS)"


def seed(url: str, n: int) -> float:
    """Insert n contacts of the bench account; seconds taken."""
    t0 = time.perf_counter()
    with common.connect(url) as conn:
        with conn.transaction():
            conn.execute("SELECT setseed(0.27)")  # the same contacts every run
            conn.execute(SEED, {"account": common.ACCOUNT, "n": n})
        conn.execute("VACUUM ANALYZE contacts")
    return time.perf_counter() - t0


def counts(conn: Any, f: dict[str, Any], repeats: int) -> tuple[int, list[float]]:
    """`segment count` (sql.segments.count, the CLI's and the API's path) timed repeatedly."""
    times: list[float] = []
    n = -1
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = segments.count(conn, common.ACCOUNT, f)
        times.append(time.perf_counter() - t0)
    return n, times


def plan(conn: Any, f: dict[str, Any]) -> str:
    """The plan of the count's statement as the function runs it (a custom plan: the
    filter's values known to the planner, as EXECUTE … USING plans it)."""
    row = conn.execute("SELECT predicate, params FROM pgcast_segment_sql_v1(%s, %s::jsonb)",
                       (common.ACCOUNT, json.dumps(f))).fetchone()
    name = f"seg_{uuid.uuid4().hex[:8]}"
    conn.execute(f"PREPARE {name}(jsonb, text) AS SELECT count(*) FROM contacts c "
                 f"WHERE c.account = $2 AND pgcast_mailable(c) AND {row['predicate']}")
    lines = conn.execute(psql.SQL("EXPLAIN (COSTS OFF) EXECUTE {}({}::jsonb, {})").format(
        psql.Identifier(name), psql.Literal(json.dumps(row["params"])),
        psql.Literal(common.ACCOUNT))).fetchall()
    conn.execute(f"DEALLOCATE {name}")
    return " | ".join(next(iter(r.values())).strip() for r in lines)


def run(url: str, contacts: int, repeats: int, rounds: int,
        send_filter: str = "five") -> list[common.Figure]:
    """Seed, time the counts, then the paired send/bare rounds of `send_filter`."""
    seeded = seed(url, contacts)
    cmd = common.command("segments", "--contacts", str(contacts), "--repeats", str(repeats),
                         "--rounds", str(rounds), "--send", send_filter)
    chosen, hand = SENDS[send_filter]
    figures: list[common.Figure] = []
    with common.connect(url) as conn:
        counts(conn, FIVE, 3)  # warm the cache
        n, times = counts(conn, FIVE, repeats)
        p50, p95 = common.percentile(times, 50), common.percentile(times, 95)
        figures.append(common.Figure(
            "segments_count_p95", f"segment count, five-clause filter ({n:,} of {contacts:,})",
            p95 * 1000, "ms", aim="<= 500 ms", passed=p95 <= 0.5, command=cmd,
            note=f"p50 {p50 * 1000:.0f} ms over {repeats}; plan: {plan(conn, FIVE)}"))
        for key, f in UNINDEXED.items():
            m, t = counts(conn, f, max(5, repeats // 4))
            figures.append(common.Figure(
                f"segments_count_{key}", f"segment count, {json.dumps(f)} ({m:,}): no index",
                common.percentile(t, 95) * 1000, "ms", command=cmd,
                note=f"p50 {common.percentile(t, 50) * 1000:.0f} ms; plan: {plan(conn, f)}"))
        n = segments.count(conn, common.ACCOUNT, chosen)
        conn.execute(PLAIN)
        sends: list[float] = []
        bare: list[float] = []
        drafts: list[uuid.UUID] = []

        def time_send() -> None:
            row = broadcasts.create(conn, common.ACCOUNT, subject="Bench",
                                    from_address="bench@example.com", text="Hello",
                                    filter_value=chosen)
            drafts.append(row["id"])
            conn.execute("CHECKPOINT")
            t0 = time.perf_counter()  # the send's one statement: lock, snapshot, attach
            got = conn.execute(QUERIES["broadcast_send"], {
                "account": common.ACCOUNT, "id": row["id"], "allow_empty": False,
                "details": "{}"}).fetchone()
            sends.append(time.perf_counter() - t0)
            assert got is not None and got["queued"] == n, (got, n)

        def time_bare() -> None:
            conn.execute("TRUNCATE seg_plain")
            conn.execute("CHECKPOINT")
            t0 = time.perf_counter()
            cur = conn.execute(hand.format(table="seg_plain"),
                               {"bid": uuid.uuid4(), "account": common.ACCOUNT})
            bare.append(time.perf_counter() - t0)
            assert cur.rowcount == n, (cur.rowcount, n)

        for i in range(rounds):
            # alternate the order so neither side always runs on a warmer cache
            for step in (time_send, time_bare) if i % 2 == 0 else (time_bare, time_send):
                step()
        paired = [s / b for s, b in zip(sends, bare, strict=True)]
        ratio = common.median(paired)
        s, b = common.median(sends), common.median(bare)
        figures += [
            common.Figure("segments_send", f"send with the {send_filter} filter: snapshot of {n:,}",
                          s * 1000, "ms", command=cmd,
                          note="median of " + ", ".join(f"{v * 1000:.0f}" for v in sends)),
            common.Figure("segments_bare", "bare INSERT … SELECT, hand-written WHERE",
                          b * 1000, "ms", command=cmd,
                          note="median of " + ", ".join(f"{v * 1000:.0f}" for v in bare)),
            common.Figure("segments_ratio", "send / bare, median of the rounds' ratios", ratio,
                          "×", aim="<= 1.5×", passed=ratio <= 1.5, command=cmd,
                          note="rounds: " + ", ".join(f"{v:.2f}" for v in paired)
                          + f"; ratio of the medians {s / b:.2f}×; seeded in {seeded:.0f} s"),
        ]
        conn.execute("DROP TABLE seg_plain")
    return figures


def main(argv: list[str] | None = None) -> None:
    """Run the segments benchmark alone on its own database."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--contacts", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=40, help="counts timed per filter")
    p.add_argument("--rounds", type=int, default=7, help="paired send/bare rounds")
    p.add_argument("--send", choices=sorted(SENDS), default="five",
                   help="the filter of the send rounds: the five-clause one, or a broad one")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    with common.bench_db("segments") as url:
        figures = run(url, args.contacts, args.repeats, args.rounds, args.send)
    common.report(figures, common.command("segments", "--contacts", str(args.contacts),
                                          "--repeats", str(args.repeats),
                                          "--rounds", str(args.rounds), "--send", args.send))
    if args.json:
        common.dump(figures, args.json)


if __name__ == "__main__":
    main()
