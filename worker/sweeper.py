"""The periodic sweeper, as a procrastinate periodic task run inside the worker processes."""

from __future__ import annotations

import logging
from typing import Any

import procrastinate
import psycopg

from sql import db
from sql.queries import QUERIES

log = logging.getLogger("pgcast.sweeper")

QUEUE = "pgcast"


def sweep_once(url: str) -> list[dict[str, Any]]:
    """Reclaim expired leases, mark lost handoffs unknown, finalize drained broadcasts."""
    with psycopg.connect(url, autocommit=True, row_factory=psycopg.rows.dict_row,
                         **db.CONNECT_KWARGS) as conn:
        rows = [dict(r) for r in conn.execute(QUERIES["sweep"]).fetchall()]
    _log(rows)
    return rows


def _log(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        log.info("sweep %s: reclaimed %s, unknown %s, finalized %s", row["broadcast_id"],
                 row["reclaimed"], row["unknown"], row["finalized"])


def make_app(url: str, cron: str, retention_days: float | None = None) -> procrastinate.App:
    """A procrastinate app whose task is the sweeper, deferred once per period (and the
    retention task when PGCAST_RETENTION_DAYS is set)."""
    # two connections per worker loop: its job fetch/LISTEN and the job itself
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=url, min_size=1, max_size=2 if retention_days is None else 4,
        kwargs=dict(db.CONNECT_KWARGS)))

    # queueing_lock: at most one sweep waiting at a time, however many workers defer it;
    # procrastinate's periodic deferrer defers each period once across all workers.
    @app.periodic(cron=cron, periodic_id="sweep")
    @app.task(name="pgcast.sweep", queue=QUEUE, queueing_lock="pgcast.sweep")
    async def sweep(timestamp: int) -> None:
        async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, row_factory=psycopg.rows.dict_row,
                **db.CONNECT_KWARGS) as conn:
            cur = await conn.execute(QUERIES["sweep"])
            _log([dict(r) for r in await cur.fetchall()])

    del sweep
    if retention_days is not None:
        from worker import retention

        retention.register(app, url, retention_days)
    return app
