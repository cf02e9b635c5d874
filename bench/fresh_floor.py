"""Where never-claimed rows begin, asked at a drain's end (issue 32): fresh_floor v1 (a walk
of the partition's key from the worker's floor) and v2 (a walk over the next 10,000 ids, then
one pass over the heap for the lowest beyond them), on a partition two workers have just
drained.

Seeds `--recipients` contacts, sends one broadcast, drains it with two null-provider workers,
then times each version `--repeat` times from floor 0 (where a worker's first look starts),
alternating, and prints the medians.

    .venv/bin/python -m bench.fresh_floor --recipients 1000000
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from typing import Any

import psycopg

from bench import common

QUERY = {1: "SELECT pgcast_fresh_floor_v1(%s, 0) AS f",
         2: "SELECT pgcast_fresh_floor_v2(%s, 0) AS f"}


def timed_ms(conn: psycopg.Connection[dict[str, Any]], version: int,
             bid: uuid.UUID) -> tuple[float, Any]:
    """One call from floor 0: milliseconds and its answer."""
    started = time.perf_counter()
    row = conn.execute(QUERY[version], (bid,)).fetchone()
    assert row is not None
    return (time.perf_counter() - started) * 1000, row["f"]


def measure(url: str, n: int, repeat: int) -> dict[int, list[float]]:
    """Seed n contacts into a migrated database, drain one broadcast to them with two
    workers, then time both versions from floor 0, alternating: milliseconds per version."""
    common.seed_contacts(url, n)
    with common.connect(url) as conn:
        bid = common.new_draft(conn)
        with common.Workers(url, 2, ["--concurrency", "2"]):
            common.send(conn, bid)
            status = common.wait_status(conn, bid)
        assert status == "sent", status
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeat):
            for version in (1, 2):
                ms, answer = timed_ms(conn, version, bid)
                assert answer is None, answer  # drained: no fresh row is left
                times[version].append(ms)
    return times


def main(argv: list[str] | None = None) -> None:
    """Drain one broadcast, then time both versions on its partition."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipients", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    print(f"cpus {os.cpu_count()}, load average at start "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    with common.bench_db("fresh_floor") as url:
        times = measure(url, args.recipients, args.repeat)
    print(f"a drained partition of {args.recipients:,} rows, from floor 0, median of "
          f"{args.repeat}:")
    for version, label in ((1, "v1, the key walked"),
                           (2, "v2, 10,000 ids walked, the heap read beyond")):
        print(f"  {common.median(times[version]):8.1f} ms  {label}")
    print(f"  v1 / v2: {common.median(times[1]) / common.median(times[2]):.1f}x")
    print(f"reproduce: {common.command('fresh_floor', '--recipients', str(args.recipients))}")


if __name__ == "__main__":
    main()
