"""The record, v5 against v6, same database and run (issue 32): server time, WAL and worker CPU.

One broadcast of N recipients is drained by this process alone, one claim of 500 at a time
(`pgcast_claim_handoff_v5`, every row handed off), each group recorded `sent` by
`pgcast_record_v5` and `pgcast_record_v6` in turn (alternating, so load on a shared machine
falls on both alike). Per recipient, for each version:
- server time inside the function (`pg_stat_user_functions.self_time`, track_functions = all),
- WAL bytes of the record's statement (`pg_current_wal_insert_lsn` around it: nothing else
  writes to this server meanwhile),
- the worker-side CPU of building and adapting the record's parameters (psycopg's own
  adaptation, `PostgresQuery.dump`, timed with `time.process_time`): the lists v5's callers
  passed against the array literals of `worker.dispatch.record_params`.

    .venv/bin/python -m bench.record_ab --recipients 200000
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from typing import Any

import psycopg
from psycopg._queries import PostgresQuery
from psycopg.adapt import Transformer

from bench import common
from pgcast.worker import dispatch

GROUP = 500
CALL = ("SELECT * FROM pgcast_record_{v}(%(id)s, %(token)s, %(ids)s, %(outcomes)s, "
        "%(message_ids)s, %(errors)s, %(retry_in)s, %(breaker)s)")


def list_params(bid: Any, token: Any, outcomes: list[dispatch.Outcome]) -> dict[str, Any]:
    """The record's parameters as the worker passed them before issue 32: Python lists."""
    return {"id": bid, "token": token, "ids": [o.contact_id for o in outcomes],
            "outcomes": [o.outcome for o in outcomes],
            "message_ids": [o.message_id for o in outcomes],
            "errors": [o.error for o in outcomes],
            "retry_in": [o.retry_in for o in outcomes], "breaker": 0}


def adapt_cpu(conn: psycopg.Connection[Any], build: Any, rounds: int = 50) -> float:
    """CPU seconds to build and adapt one record's parameters (mean of `rounds`)."""
    query = CALL.format(v="v6").encode()
    t0 = time.process_time()
    for _ in range(rounds):
        p = build()
        pq = PostgresQuery(Transformer(conn))
        pq.convert(query, p)
        pq.dump(p)
    return (time.process_time() - t0) / rounds


def lsn(conn: psycopg.Connection[dict[str, Any]]) -> str:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text AS l").fetchone()
    assert row is not None
    return str(row["l"])


def main(argv: list[str] | None = None) -> None:
    """Drain one broadcast recording its groups with v5 and v6 in turn; print both."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipients", type=int, default=200_000)
    args = p.parse_args(argv)
    cmd = common.command("record_ab", "--recipients", str(args.recipients))
    print(f"load average at start {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)
    rows = {"v5": 0, "v6": 0}
    wal_bytes = {"v5": 0, "v6": 0}
    with common.bench_db("record_ab") as url:
        common.seed_contacts(url, args.recipients)
        with common.connect(url) as conn:
            conn.autocommit = True
            conn.execute("SET track_functions = 'all'")
            bid = common.new_draft(conn)
            common.send(conn, bid)
            conn.execute("SELECT pg_stat_reset()")
            after, g = 0, 0
            params_cpu = {"lists": 0.0, "literals": 0.0}
            while True:
                token = uuid.uuid4()
                claimed = conn.execute(
                    "SELECT * FROM pgcast_claim_handoff_v5(%s, %s, %s, 'bench', "
                    "'1 minute', %s)", (bid, GROUP, token, after)).fetchall()
                if not claimed:
                    break
                after = claimed[0]["last_fresh"] or after
                outcomes = [dispatch.Outcome(r["contact_id"], "sent",
                                             message_id=f"null-1-{r['contact_id']}")
                            for r in claimed]
                v = "v5" if g % 2 == 0 else "v6"
                g += 1
                before = lsn(conn)
                conn.execute(CALL.format(v=v), dispatch.record_params(bid, token, outcomes, 0))
                d = conn.execute("SELECT pg_wal_lsn_diff(%s, %s)::bigint AS d",
                                 (lsn(conn), before)).fetchone()
                assert d is not None
                wal_bytes[v] += int(d["d"])
                rows[v] += len(outcomes)
                if g <= 20:  # the adaptation cost does not depend on the database
                    params_cpu["lists"] += adapt_cpu(
                        conn, lambda o=outcomes, t=token: list_params(bid, t, o))
                    params_cpu["literals"] += adapt_cpu(
                        conn, lambda o=outcomes, t=token: dispatch.record_params(bid, t, o, 0))
            conn.execute("SELECT pg_stat_force_next_flush()")
            fn = {r["f"]: float(r["ms"]) for r in conn.execute(
                "SELECT funcname AS f, self_time AS ms FROM pg_stat_user_functions "
                "WHERE funcname IN ('pgcast_record_v5', 'pgcast_record_v6')")}
            done = conn.execute("SELECT sent, total FROM broadcasts WHERE id = %s",
                                (bid,)).fetchone()
    assert done is not None and done["sent"] == done["total"], done
    per_group = min(g, 20)
    print(f"== {args.recipients:,} recipients, groups of {GROUP}, v5 and v6 in turn")
    for v in ("v5", "v6"):
        n = rows[v]
        print(f"   pgcast_record_{v}: {n:,} recipients; server time "
              f"{fn.get(f'pgcast_record_{v}', 0.0) * 1000 / n:.1f} µs/recipient; WAL "
              f"{wal_bytes[v] / n:.0f} bytes/recipient")
    t5 = fn.get("pgcast_record_v5", 0.0) / rows["v5"]
    t6 = fn.get("pgcast_record_v6", 0.0) / rows["v6"]
    print(f"   v6 / v5: server time {t6 / t5:.2f}x; WAL bytes "
          f"{(wal_bytes['v6'] / rows['v6']) / (wal_bytes['v5'] / rows['v5']):.2f}x")
    lists = params_cpu["lists"] / per_group / GROUP * 1e6
    literals = params_cpu["literals"] / per_group / GROUP * 1e6
    print(f"   worker CPU to build and adapt a record's parameters: lists {lists:.2f} "
          f"µs/recipient, array literals {literals:.2f} µs/recipient ({literals / lists:.2f}x)")
    print(f"load average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"reproduce: {cmd}")


if __name__ == "__main__":
    main()
