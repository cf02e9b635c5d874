"""What the record costs the server over a bare UPDATE of the same rows (issue 32's server half).

One broadcast of N recipients on a fresh database, drained by this process alone: claims of
500 by `pgcast_claim_handoff_v6` (every row handed off), each group then marked by either
`pgcast_record_v6` (every row `sent`, with its message id) or the floor's statement (bench.floor's
`UPDATE … SET status = 'sent', attempts = attempts + 1, sent_at = now(), lease_expires_at =
NULL WHERE … contact_id = ANY (…)`), alternating group by group so that load on a shared
machine falls on both alike; after each group, the record's five array parameters parsed
alone (`cardinality` of each) and the record's broadcast-row update alone (a no-op counter
update with v6's audit_log concatenation). Wall time per statement from this client, in
milliseconds per group of 500 (median). The floor's UPDATE commits synchronously (this
session's default); the record commits asynchronously (it says so inside).

    .venv/bin/python -m bench.record_cost --recipients 120000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

from bench import common
from pgcast.worker import dispatch

GROUP = 500
CLAIM = ("SELECT * FROM pgcast_claim_handoff_v6(%s, %s, %s, 'bench', '30 s', %s, false)")
RECORD = ("SELECT * FROM pgcast_record_v6(%(id)s, %(token)s, %(ids)s::bigint[], "
          "%(outcomes)s::text[], %(message_ids)s::text[], %(errors)s::text[], "
          "%(retry_in)s::double precision[], %(breaker)s)")
BARE = ("UPDATE broadcast_recipients SET status = 'sent', attempts = attempts + 1, "
        "sent_at = now(), lease_expires_at = NULL "
        "WHERE broadcast_id = %(id)s AND contact_id = ANY (%(ids)s::bigint[])")
ARRAYS = ("SELECT cardinality(%(ids)s::bigint[]) + cardinality(%(outcomes)s::text[]) "
          "+ cardinality(%(message_ids)s::text[]) + cardinality(%(errors)s::text[]) "
          "+ cardinality(%(retry_in)s::double precision[])")
BROADCAST = ("UPDATE broadcasts SET sent = sent + 0, audit_log = audit_log || '[]'::jsonb "
             "|| '[]'::jsonb, updated_at = now() WHERE id = %(id)s")


def main(argv: list[str] | None = None) -> None:
    """Drain one broadcast, timing each group's record or bare UPDATE; print the medians."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipients", type=int, default=120_000)
    args = p.parse_args(argv)
    print(f"cpus {os.cpu_count()}, load average at start "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    times: dict[str, list[float]] = {"claim and hand off (pgcast_claim_handoff_v6)": [],
                                     "record (pgcast_record_v6)": [],
                                     "bare UPDATE (the floor's)": [],
                                     "the record's five arrays, parsed alone": [],
                                     "the record's broadcast-row update, alone": []}
    names = list(times)
    with common.bench_db("record_cost") as url:
        common.seed_contacts(url, args.recipients)
        with common.connect(url) as conn:
            bid = common.new_draft(conn)
            common.send(conn, bid)
            conn.execute("ANALYZE")
            after, g = 0, 0
            while True:
                token = uuid.uuid4()
                t0 = time.perf_counter()
                rows = conn.execute(CLAIM, (bid, GROUP, token, after)).fetchall()
                times[names[0]].append(time.perf_counter() - t0)
                if not rows:
                    break
                after = rows[0]["last_fresh"]
                outcomes = [dispatch.Outcome(r["contact_id"], "sent", f"null-1-{r['contact_id']}")
                            for r in rows]
                params = dispatch.record_params(bid, token, outcomes, 0)
                for name, statement in ((names[1 + g % 2], RECORD if g % 2 == 0 else BARE),
                                        (names[3], ARRAYS), (names[4], BROADCAST)):
                    t0 = time.perf_counter()
                    conn.execute(statement, params)
                    times[name].append(time.perf_counter() - t0)
                g += 1
    print(f"{args.recipients:,} recipients, {g} groups of up to {GROUP}; ms per group "
          "(median), and µs per recipient:")
    for name, values in times.items():
        ms = statistics.median(values) * 1000
        print(f"  {ms:7.3f} ms  {ms * 1000 / GROUP:6.2f} µs  {name}")
    print("load average at end " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"reproduce: {common.command('record_cost', '--recipients', str(args.recipients))}")


if __name__ == "__main__":
    main()
