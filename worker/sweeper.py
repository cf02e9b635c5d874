"""The periodic sweeper, as a procrastinate periodic task run inside the worker processes."""

from __future__ import annotations

import logging
from typing import Any

import procrastinate
import psycopg

from sql.queries import QUERIES

log = logging.getLogger("pgcast.sweeper")

QUEUE = "pgcast"
COUNTS = ("status", "total", "sent", "failed", "skipped", "unknown", "cancelled")


def sweep_once(url: str) -> list[dict[str, Any]]:
    """Reclaim expired leases, mark lost handoffs unknown, finalize drained broadcasts."""
    with psycopg.connect(url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        rows = [dict(r) for r in conn.execute(QUERIES["sweep"]).fetchall()]
        counts = [conn.execute(QUERIES["broadcast_counts"], {"id": r["broadcast_id"]}).fetchone()
                  for r in rows if r["finalized"]]
    _log(rows, [c for c in counts if c is not None])
    return rows


def _log(rows: list[dict[str, Any]], finished: list[Any]) -> None:
    # every run at DEBUG; what it changed at INFO (an operator wants finished broadcasts,
    # and reclaimed leases or unknown outcomes mean a worker died)
    log.debug("sweep ran: %d broadcasts changed", len(rows))
    for row in rows:
        if row["reclaimed"] or row["unknown"]:
            log.info("sweep %s: reclaimed %s, unknown %s", row["broadcast_id"], row["reclaimed"],
                     row["unknown"])
    for bid, c in zip([r["broadcast_id"] for r in rows if r["finalized"]], finished,
                      strict=False):
        log.info("broadcast %s finished %s: total %s, sent %s, failed %s, skipped %s, "
                 "unknown %s, cancelled %s", bid, *(c[k] for k in COUNTS))


def make_app(url: str, cron: str) -> procrastinate.App:
    """A procrastinate app whose only task is the sweeper, deferred once per period."""
    # two connections: the job fetch/LISTEN and the sweep itself need no more per worker
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=url, min_size=1, max_size=2))

    # queueing_lock: at most one sweep waiting at a time, however many workers defer it;
    # procrastinate's periodic deferrer defers each period once across all workers.
    @app.periodic(cron=cron, periodic_id="sweep")
    @app.task(name="pgcast.sweep", queue=QUEUE, queueing_lock="pgcast.sweep")
    async def sweep(timestamp: int) -> None:
        async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
            cur = await conn.execute(QUERIES["sweep"])
            rows = [dict(r) for r in await cur.fetchall()]
            finished = []
            for r in rows:
                if r["finalized"]:
                    got = await conn.execute(QUERIES["broadcast_counts"], {"id": r["broadcast_id"]})
                    finished.append(await got.fetchone())
            _log(rows, finished)

    del sweep
    return app
