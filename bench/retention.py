"""Retention: a 200k drain with 5,000 finished broadcasts of mixed ages in the database, before
and after `pgcast retention`, against a fresh database; retention's time, the archive's size,
and the "was this address sent broadcast X" lookup on archived and live broadcasts."""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from typing import Any

from bench import common, drain

OLD_ACCOUNT = "old"  # the finished broadcasts' account: other contacts than the drain's
MAX_AGE_DAYS = 1000  # ages are uniform in [0, MAX_AGE_DAYS): ~9% stay live at 90 days
LOOKUPS = 1000  # per kind (archived, live)


def add_finished(url: str, n: int, size: int, seed: int = 1) -> None:
    """n broadcasts of `size` recipients each, sent through pgcast's own send (one partition
    apiece), then marked sent with provider message ids and finished 0-1000 days ago."""
    from pgcast.sql import broadcasts

    rnd = random.Random(seed)
    with common.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")  # setup only: nothing here is timed
        conn.execute("INSERT INTO contacts (account, email, name) SELECT %s, "
                     "'old' || g || '@example.com', 'Old ' || g FROM generate_series(1, %s) g",
                     (OLD_ACCOUNT, size))
        for _ in range(n):
            row = broadcasts.create(conn, OLD_ACCOUNT, subject="Old", from_address="o@example.com",
                                    text="old", tag=None)
            bid = row["id"]
            assert broadcasts.send(conn, OLD_ACCOUNT, bid)["success"]
            days = rnd.uniform(0, MAX_AGE_DAYS)
            with conn.transaction():
                # an SES message id is 60 characters: what the archive keeps per recipient
                conn.execute(
                    "UPDATE broadcast_recipients SET status = 'sent', worker = 'bench', "
                    "attempts = 1, sent_at = now() - %(d)s * interval '1 day', "
                    "provider_message_id = '0100018c' || md5(contact_id::text || %(id)s::text)"
                    " || '-' || left(md5(%(id)s::text), 12) || '-000000' "
                    "WHERE broadcast_id = %(id)s", {"id": bid, "d": days})
                conn.execute(
                    "UPDATE broadcasts SET status = 'sent', sent = total, "
                    "finished_at = now() - %(d)s * interval '1 day' WHERE id = %(id)s",
                    {"id": bid, "d": days})
        # a long-lived database has long since vacuumed the catalog churn of those sends
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def paired_rounds(fresh: str, aged: str, rounds: int) -> list[tuple[float, float]]:
    """(fresh, aged) 200k drain rates, each pair back to back, workers started per drain."""
    out = []
    for _ in range(rounds):
        pair = []
        for url in (fresh, aged):
            with common.Workers(url, drain.WORKERS, ["--concurrency", str(drain.CONCURRENCY)]) as w:
                pair.append(drain.drain_one(url, w).rate)
        out.append((pair[0], pair[1]))
    return out


def lookups(url: str, archived: bool, size: int,
            recipients: int) -> tuple[list[float], list[float]]:
    """Milliseconds per `recipient_lookup` of a random address of a random broadcast, as the
    client sees it and as the server spends it (planning + execution, EXPLAIN ANALYZE)."""
    from pgcast.sql.queries import QUERIES

    rnd = random.Random(7)
    with common.connect(url) as conn:
        if archived:
            ids = [r["id"] for r in conn.execute(
                "SELECT id FROM broadcasts WHERE archived_at IS NOT NULL")]
        else:
            ids = [r["id"] for r in conn.execute(
                "SELECT id FROM broadcasts WHERE archived_at IS NULL AND status = 'sent'")]
        accounts = {r["id"]: r["account"] for r in conn.execute(
            "SELECT id, account FROM broadcasts WHERE id = ANY(%s)", (ids,))}
        samples, server = [], []
        for _ in range(LOOKUPS):
            bid = rnd.choice(ids)
            if accounts[bid] == OLD_ACCOUNT:
                email = f"old{rnd.randint(1, size)}@example.com"
            else:
                email = f"user{rnd.randint(1, recipients)}@example.com"
            t0 = time.perf_counter()
            rows = conn.execute(QUERIES["recipient_lookup"], {"id": bid, "email": email}).fetchall()
            samples.append((time.perf_counter() - t0) * 1000)
            assert len(rows) == 1 and rows[0]["archived"] is archived, (bid, email, rows)
            plan = conn.execute("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) "  # type: ignore[operator]
                                + QUERIES["recipient_lookup"], {"id": bid, "email": email}
                                ).fetchone()
            assert plan is not None
            top = next(iter(plan.values()))[0]
            server.append(float(top["Planning Time"]) + float(top["Execution Time"]))
    return samples, server


def sizes(url: str, recipients: int) -> dict[str, float]:
    """Bytes of the archive and of a live 200k partition, and their rows."""
    with common.connect(url) as conn:
        arch = conn.execute(
            "SELECT pg_table_size('broadcast_recipients_archive') AS heap, "
            "pg_indexes_size('broadcast_recipients_archive') AS idx, "
            "(SELECT count(*) FROM broadcast_recipients_archive) AS n").fetchone()
        big = conn.execute(
            "SELECT id FROM broadcasts WHERE account = %s AND total = %s LIMIT 1",
            (common.ACCOUNT, recipients)).fetchone()
        assert arch is not None and big is not None
        live = conn.execute("SELECT pg_total_relation_size(pgcast_partition_name_v1(%s)) AS b",
                            (big["id"],)).fetchone()
        assert live is not None
    return {"heap": float(arch["heap"]), "index": float(arch["idx"]), "rows": float(arch["n"]),
            "live": float(live["b"]), "live_rows": float(recipients)}


def run(url: str | None, broadcasts: int, size: int, recipients: int, rounds: int,
        older_than: str, cmd: str) -> list[common.Figure]:
    """The whole benchmark on two fresh databases; its figures."""
    from pgcast.sql import retention

    figures: list[common.Figure] = []
    server = contextlib.nullcontext(url) if url else common.server()
    with server as srv, common.database(srv, "ret_fresh") as fresh, \
            common.database(srv, "ret_aged") as aged:
        common.seed_contacts(fresh, recipients)
        common.seed_contacts(aged, recipients)
        t0 = time.perf_counter()
        add_finished(aged, broadcasts, size)
        setup = time.perf_counter() - t0
        before = paired_rounds(fresh, aged, rounds)
        with common.connect(aged) as conn:
            report = retention.run(conn, retention.parse_age(older_than))
            live_left = conn.execute("SELECT count(*) AS n FROM pg_inherits WHERE "
                                     "inhparent = 'broadcast_recipients'::regclass").fetchone()
            conn.execute("VACUUM ANALYZE")  # as autovacuum would, after the catalog churn
        after = paired_rounds(fresh, aged, rounds)
        looked_archived = lookups(aged, True, size, recipients)
        looked_live = lookups(aged, False, size, recipients)
        sz = sizes(aged, recipients)

    def ratio_figure(key: str, label: str, pairs: list[tuple[float, float]],
                     aim: str, ok: Any) -> common.Figure:
        value = common.median([a / f for f, a in pairs])
        of_medians = common.median([a for _, a in pairs]) / common.median([f for f, _ in pairs])
        return common.Figure(
            key, label, value, "×", aim=aim, passed=ok(value) if aim else None, command=cmd,
            note="median of paired rounds (aged/fresh recipients/s) "
                 + ", ".join(f"{a:,.0f}/{f:,.0f}" for f, a in pairs)
                 + f"; ratio of the medians {of_medians:.2f}")

    figures.append(ratio_figure(
        "retention_before", f"{recipients // 1000}k drain with {broadcasts:,} finished "
        "broadcasts attached / fresh database", before, "", None))
    figures[-1].note += f"; {broadcasts:,} broadcasts of {size} set up in {setup:.0f}s"
    figures.append(ratio_figure(
        "retention_after", f"{recipients // 1000}k drain after `pgcast retention "
        f"--older-than {older_than}` / fresh database", after, ">= 0.9×", lambda v: v >= 0.9))
    figures[-1].note += f"; partitions still attached: {live_left['n'] if live_left else '?'}"
    figures.append(common.Figure(
        "retention_time", f"pgcast retention, {report.broadcasts:,} broadcasts archived",
        report.seconds, "s", command=cmd,
        note=f"{report.recipients:,} recipients; "
             f"{report.seconds / max(1, report.broadcasts) * 1000:.1f} ms per broadcast "
             "(DETACH CONCURRENTLY, copy, drop)"))
    per_row = (sz["heap"] + sz["index"]) / max(1.0, sz["rows"])
    figures.append(common.Figure(
        "retention_archive_size", "archive size per 1,000,000 recipients", per_row * 1e6 / 2**20,
        "MB", command=cmd,
        note=f"{sz['rows']:,.0f} rows: heap {sz['heap'] / 2**20:.1f} MB + index "
             f"{sz['index'] / 2**20:.1f} MB = {per_row:.0f} bytes/recipient; a live "
             f"{recipients // 1000}k partition with its indexes: "
             f"{sz['live'] / sz['live_rows']:.0f} bytes/recipient"))
    for key, kind, (samples, server) in (("archived", "archived", looked_archived),
                                         ("live", "live", looked_live)):
        p99 = common.percentile(samples, 99)
        figures.append(common.Figure(
            f"retention_lookup_{key}", f"'was this address sent broadcast X' p99, {kind} "
            "broadcasts", p99, "ms", aim="<= 10 ms", passed=p99 <= 10, command=cmd,
            note=f"{len(samples)} lookups (query recipient_lookup) from the client, median "
                 f"{common.median(samples):.2f} ms; in the server (planning + execution) "
                 f"p99 {common.percentile(server, 99):.2f} ms, median "
                 f"{common.median(server):.2f} ms"))
    return figures


def main(argv: list[str] | None = None) -> None:
    """Run and print the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--broadcasts", type=int, default=5_000)
    p.add_argument("--size", type=int, default=20, help="recipients per finished broadcast")
    p.add_argument("--recipients", type=int, default=200_000, help="the drain's size")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--older-than", default="90d")
    args = p.parse_args(argv)
    cmd = common.command("retention", "--broadcasts", str(args.broadcasts), "--size",
                         str(args.size), "--recipients", str(args.recipients), "--rounds",
                         str(args.rounds))
    figures = run(None, args.broadcasts, args.size, args.recipients, args.rounds,
                  args.older_than, cmd)
    common.report(figures, cmd)


if __name__ == "__main__":
    main()
