"""Snapshot: time of `send` for N contacts against a bare INSERT … SELECT of the same rows."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable
from pathlib import Path

from bench import common

# The same columns and defaults as broadcast_recipients, no index, no constraint: what an
# INSERT … SELECT of these rows costs with nothing else to maintain.
PLAIN = "CREATE TABLE snapshot_plain (LIKE broadcast_recipients INCLUDING DEFAULTS)"
# The same columns, constraints, indexes and key as a partition, maintained row by row.
INDEXED = ("CREATE TABLE snapshot_indexed (LIKE broadcast_recipients INCLUDING ALL, "
           "PRIMARY KEY (contact_id)) WITH (fillfactor = 100)")
BARE = """
INSERT INTO {table} (broadcast_id, contact_id, email)
SELECT %(bid)s, c.id, c.email FROM contacts c
WHERE c.account = %(account)s AND c.unsubscribed_at IS NULL
"""


def run(url: str, recipients: int, repeats: int) -> list[common.Figure]:
    """Seed `recipients` contacts, then time `send` and the bare INSERT … SELECT `repeats`
    times each, on emptied tables."""
    common.seed_contacts(url, recipients)
    sends: list[float] = []
    bare: list[float] = []
    indexed: list[float] = []
    with common.connect(url) as conn:
        conn.execute(PLAIN)
        conn.execute(INDEXED)
        drafts = []

        def time_send() -> None:
            conn.execute("TRUNCATE broadcast_recipients")
            bid = common.new_draft(conn)
            drafts.append(bid)
            conn.execute("CHECKPOINT")  # each trial starts with no dirty pages to flush
            n, seconds = common.send(conn, bid)
            assert n == recipients, (n, recipients)
            sends.append(seconds)

        def time_bare(table: str, into: list[float]) -> None:
            conn.execute(f"TRUNCATE {table}")
            conn.execute("CHECKPOINT")
            into.append(common.timed(lambda: conn.execute(
                BARE.format(table=table),
                {"bid": uuid.uuid4(), "account": common.ACCOUNT})))

        for i in range(repeats):
            # alternate the order so neither side always runs on a warmer cache
            steps: list[Callable[[], None]] = [
                time_send, lambda: time_bare("snapshot_plain", bare),
                lambda: time_bare("snapshot_indexed", indexed)]
            for step in steps if i % 2 == 0 else reversed(steps):
                step()
        conn.execute("TRUNCATE broadcast_recipients")
        conn.execute("UPDATE broadcasts SET status = 'cancelled' WHERE id = ANY (%s)", (drafts,))
        conn.execute("DROP TABLE snapshot_plain, snapshot_indexed")
    cmd = common.command("snapshot", "--recipients", str(recipients), "--repeats", str(repeats))
    s, b, x = common.median(sends), common.median(bare), common.median(indexed)
    # each round times send and bare back to back: the median of their ratios is what the
    # aim is checked on (this machine's speed drifts over a run; a pair shares one moment)
    paired = [si / bi for si, bi in zip(sends, bare, strict=True)]
    ratio = common.median(paired)
    return [
        common.Figure("snapshot_send", f"send (snapshot) of {recipients:,} contacts", s, "s",
                      command=cmd, note="median of " + ", ".join(f"{v:.2f}" for v in sends)),
        common.Figure("snapshot_bare", "bare INSERT … SELECT, same rows, plain table", b, "s",
                      command=cmd, note="median of " + ", ".join(f"{v:.2f}" for v in bare)),
        common.Figure("snapshot_indexed",
                      "bare INSERT … SELECT into a copy with a partition's indexes and key",
                      x, "s", command=cmd,
                      note="median of " + ", ".join(f"{v:.2f}" for v in indexed)),
        common.Figure("snapshot_ratio", "send / bare INSERT … SELECT, median of the rounds' ratios",
                      ratio, "×", aim="<= 1.5×", passed=ratio <= 1.5, command=cmd,
                      note="rounds: " + ", ".join(f"{v:.2f}" for v in paired)
                      + f"; ratio of the medians {s / b:.2f}×; against the indexed copy "
                      f"{s / x:.2f}×"),
    ]


def main(argv: list[str] | None = None) -> None:
    """Run the snapshot benchmark alone on its own database."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipients", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    with common.bench_db("snapshot") as url:
        figures = run(url, args.recipients, args.repeats)
    common.report(figures, common.command("snapshot", "--recipients", str(args.recipients),
                                          "--repeats", str(args.repeats)))
    if args.json:
        common.dump(figures, args.json)


if __name__ == "__main__":
    main()
