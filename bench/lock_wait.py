"""What the API's bounded lock wait costs a sign-up (migration 0032's gaps): the `signup`
statement run by `api.db.one` as the API runs it now (after the lock wait's limit, SET LOCAL,
in one psycopg pipeline: one implicit transaction, one round trip) against the same statement
alone in autocommit (as before), same process, same pool, same database.

Paired rounds, back to back (bounded first in even rounds, plain first in odd ones); each
round runs `--per-round` sign-ups of new addresses one after another, from one task. Printed:
the median per-sign-up time of each, the median of the paired ratios, and the ratio of the
medians.

    .venv/bin/python -m bench.lock_wait --rounds 15 --per-round 200
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

from bench import common
from pgcast.api import db


async def _round(pool: db.Pool, form: uuid.UUID, n: int, bounded: bool) -> float:
    names = db.ERASURE_LOCKED if bounded else db.ERASURE_LOCKED - {"signup"}
    saved = db.ERASURE_LOCKED
    db.ERASURE_LOCKED = names
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            await db.one(pool, "signup", {
                "form": form, "email": f"{uuid.uuid4().hex}@example.com", "name": "",
                "max_mails": 3, "details": "{}", "subject": "Confirm", "text": "Confirm: x",
                "html": None})
        return (time.perf_counter() - t0) / n
    finally:
        db.ERASURE_LOCKED = saved


async def _run(url: str, rounds: int, per_round: int) -> dict[str, Any]:
    with common.connect(url) as conn:
        row = conn.execute("INSERT INTO forms (account, name, from_address) "
                           "VALUES ('bench', 'News', 'news@example.com') RETURNING id"
                           ).fetchone()
        assert row is not None
        form = row["id"]
    pool = db.make_pool(url, 2)
    await pool.open(wait=True)
    try:
        await _round(pool, form, 20, True)  # warm the connections and the plans
        await _round(pool, form, 20, False)
        bounded: list[float] = []
        plain: list[float] = []
        for i in range(rounds):
            order = (True, False) if i % 2 == 0 else (False, True)
            for b in order:
                (bounded if b else plain).append(await _round(pool, form, per_round, b))
    finally:
        await pool.close()
    return {"bounded": bounded, "plain": plain}


def main(argv: list[str] | None = None) -> int:
    """Run the paired rounds and print the figures."""
    p = argparse.ArgumentParser(prog="bench.lock_wait", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--per-round", type=int, default=200)
    p.add_argument("--database-url", default=None, help="a server to use (default: embedded)")
    args = p.parse_args(argv)
    with common.bench_db("lockwait", args.database_url) as url:
        out = asyncio.run(_run(url, args.rounds, args.per_round))
    b, pl = out["bounded"], out["plain"]
    ratios = [x / y for x, y in zip(b, pl, strict=True)]
    figures = [
        common.Figure("signup_bounded_ms", "sign-up, bounded lock wait (median per call)",
                      common.median(b) * 1000, "ms"),
        common.Figure("signup_plain_ms", "sign-up, autocommit as before (median per call)",
                      common.median(pl) * 1000, "ms"),
        common.Figure("signup_ratio", "bounded / plain, median of paired rounds",
                      common.median(ratios), "x",
                      note=f"ratio of the medians: {common.median(b) / common.median(pl):.2f}"),
    ]
    common.report(figures, common.command("lock_wait", "--rounds", str(args.rounds),
                                          "--per-round", str(args.per_round)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
