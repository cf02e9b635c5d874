"""A whole-account send through pgcast_send_v6 (0018: the filter compiled in the send) against
pgcast_send_v5 (0012: the tag only), same contacts, same database, paired rounds."""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from bench import common
from pgcast.schema import migrations

V5 = re.compile(r"CREATE FUNCTION pgcast_send_v5\(.*?\n\$\$;", re.DOTALL)


def _send(conn: Any, function: str) -> float:
    bid = common.new_draft(conn)
    conn.execute("CHECKPOINT")
    t0 = time.perf_counter()
    row = conn.execute(f"SELECT * FROM {function}(%s, %s)", (common.ACCOUNT, bid)).fetchone()
    elapsed = time.perf_counter() - t0
    assert row is not None and row["ok"], row
    conn.execute("TRUNCATE broadcast_recipients")  # detach nothing: drop every partition's rows
    conn.execute("UPDATE broadcasts SET status = 'cancelled' WHERE id = %s", (bid,))
    return elapsed


def run(url: str, contacts: int, rounds: int) -> list[common.Figure]:
    """Seed, recreate v5 beside v6, then time both in alternating pairs."""
    common.seed_contacts(url, contacts)
    source = next(m for m in migrations() if m.version == 12).sql
    match = V5.search(source)
    assert match is not None
    v5: list[float] = []
    v6: list[float] = []
    with common.connect(url) as conn:
        conn.execute(match.group(0))  # 0012's v5, as it shipped
        for i in range(rounds):
            pair = (("pgcast_send_v5", v5), ("pgcast_send_v6", v6))
            for function, into in pair if i % 2 == 0 else reversed(pair):
                into.append(_send(conn, function))
    cmd = common.command("send_versions", "--contacts", str(contacts), "--rounds", str(rounds))
    paired = [b / a for a, b in zip(v5, v6, strict=True)]
    return [
        common.Figure("send_v5", f"pgcast_send_v5, {contacts:,} contacts", common.median(v5),
                      "s", command=cmd, note=", ".join(f"{v:.2f}" for v in v5)),
        common.Figure("send_v6", f"pgcast_send_v6, {contacts:,} contacts", common.median(v6),
                      "s", command=cmd, note=", ".join(f"{v:.2f}" for v in v6)),
        common.Figure("send_v6_v5", "v6 / v5, median of the rounds' ratios",
                      common.median(paired), "×", command=cmd,
                      note="rounds: " + ", ".join(f"{v:.2f}" for v in paired)),
    ]


def main(argv: list[str] | None = None) -> None:
    """Run alone on its own database."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--contacts", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    with common.bench_db("send_versions") as url:
        figures = run(url, args.contacts, args.rounds)
    common.report(figures, common.command("send_versions", "--contacts", str(args.contacts),
                                          "--rounds", str(args.rounds)))


if __name__ == "__main__":
    main()
