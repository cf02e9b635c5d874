"""What the erasure check costs a statement (migration 0035): pgcast_erased_v1 as it is now
(plpgsql, its plan kept for the session) against its body as a SQL function, as it was before
(a copy made in pg_temp for the run), each called once per transaction, as a sign-up's
statements call it. Same connection, same database, alternating rounds; an empty statement of
the same shape gives the round trip. Printed: median microseconds per call over the round
trip, for each; then each called for many rows in one statement (as the messages' handoff
calls it, once per message), in a caller with plan_cache_mode auto and in one that forces
custom plans as pgcast_message_handoff_v2 does: median microseconds per row.

    .venv/bin/python -m bench.erased_check --rounds 6 --calls 2000
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import common

SQL_BODY = """CREATE FUNCTION pg_temp.erased_sql(p_account text, p_address text)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM public.contact_erasures e, public.erasure_keys k
                   WHERE e.account = p_account
                     AND e.email_hash = sha256(k.k2 || sha256(k.k1 || sha256(
                         convert_to(lower(btrim(p_address)), 'UTF8')))))
$$"""

# a caller that checks n addresses in one statement, with its plan_cache_mode (as the
# messages' handoff checks each message's address in one UPDATE)
ROWS = """CREATE FUNCTION pg_temp.{name}(n integer) RETURNS bigint LANGUAGE plpgsql
SET plan_cache_mode = {mode} AS $$
BEGIN
    RETURN (SELECT count(*) FILTER (WHERE {fn}('bench', 'a' || g || '@example.com'))
            FROM generate_series(1, n) g);
END
$$"""
ROW_COUNT = 20_000


def main(argv: list[str] | None = None) -> int:
    """Alternate the rounds and print the medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=6, help="rounds of each")
    ap.add_argument("--calls", type=int, default=2000, help="transactions per round")
    args = ap.parse_args(argv)
    with common.bench_db("erased_check") as url, common.connect(url) as conn:
        conn.execute("INSERT INTO erasure_keys DEFAULT VALUES ON CONFLICT DO NOTHING")
        conn.execute(SQL_BODY)
        statements = {"empty": "SELECT %s::text IS NULL",
                      "plpgsql (now)": "SELECT pgcast_erased_v1('bench', %s)",
                      "sql (before)": "SELECT pg_temp.erased_sql('bench', %s)"}
        times: dict[str, list[float]] = {k: [] for k in statements}
        for r in range(args.rounds):
            order = list(statements) if r % 2 == 0 else list(reversed(statements))
            for name in order:
                t = time.perf_counter()
                for i in range(args.calls):
                    conn.execute(statements[name], (f"a{r}.{i}@example.com",))  # type: ignore[arg-type]
                times[name].append((time.perf_counter() - t) / args.calls * 1e6)
        base = statistics.median(times["empty"])
        print(f"round trip of an empty statement: {base:.1f} us")
        for name in ("plpgsql (now)", "sql (before)"):
            med = statistics.median(times[name])
            print(f"pgcast_erased_v1 {name}: {med:.1f} us a call, {med - base:.1f} us over the "
                  f"round trip (rounds: {', '.join(f'{t:.0f}' for t in times[name])})")
        for mode in ("auto", "force_custom_plan"):
            for fn in ("pgcast_erased_v1", "pg_temp.erased_sql"):
                conn.execute(ROWS.format(fn=fn, name=f"rows_{fn.replace('.', '_')}_{mode}",
                                         mode=mode))  # type: ignore[arg-type]
            per_row: dict[str, list[float]] = {"plpgsql (now)": [], "sql (before)": []}
            for r in range(args.rounds):
                for name in (list(per_row) if r % 2 == 0 else list(reversed(per_row))):
                    fn = "pgcast_erased_v1" if name == "plpgsql (now)" else "pg_temp.erased_sql"
                    t = time.perf_counter()
                    conn.execute(f"SELECT pg_temp.rows_{fn.replace('.', '_')}_{mode}(%s)",  # type: ignore[arg-type]
                                 (ROW_COUNT,))
                    per_row[name].append((time.perf_counter() - t) / ROW_COUNT * 1e6)
            for name, per in per_row.items():
                print(f"pgcast_erased_v1 {name}, {ROW_COUNT:,} rows in one statement of a "
                      f"caller with plan_cache_mode {mode}: {statistics.median(per):.2f} us a row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
