"""The periodic sweeper, as a procrastinate periodic task run inside the worker processes."""

from __future__ import annotations

import logging
from typing import Any

import procrastinate
import psycopg

from pgcast.sql import db
from pgcast.sql.queries import QUERIES
from pgcast.worker import reconcile, starter, testsend

log = logging.getLogger("pgcast.sweeper")

QUEUE = "pgcast"
COUNTS = ("status", "total", "sent", "failed", "skipped", "unknown", "cancelled")


def sweep_conn(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """One sweep on an autocommit connection: one broadcast per transaction."""
    done: list[dict[str, Any]] = []
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    ids = [r["id"] for r in cur.execute(QUERIES["sweep_candidates"]).fetchall()]
    for bid in ids:
        done.extend(dict(r) for r in cur.execute(QUERIES["sweep_one"], {"id": bid}).fetchall())
    cur.execute(QUERIES["rate_shares_prune"])  # fair-share state of takers gone a minute
    cur.execute(QUERIES["message_sweep"])  # messages a lost worker left sending: unknown
    after = reconcile.after_from_env()
    if after is not None:
        _log_requeued(reconcile.requeue(conn, after))
    return done


async def sweep_async(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """sweep_conn on an asynchronous autocommit connection."""
    done: list[dict[str, Any]] = []
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    await cur.execute(QUERIES["sweep_candidates"])
    ids = [r["id"] for r in await cur.fetchall()]
    for bid in ids:
        await cur.execute(QUERIES["sweep_one"], {"id": bid})
        done.extend(dict(r) for r in await cur.fetchall())
    await cur.execute(QUERIES["rate_shares_prune"])  # fair-share state of takers gone a minute
    await cur.execute(QUERIES["message_sweep"])  # messages a lost worker left sending: unknown
    after = reconcile.after_from_env()
    if after is not None:
        _log_requeued(await reconcile.requeue_async(conn, after))
    return done


def _log_requeued(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        log.info("reconcile %s: %s unknown recipients had no SES event after "
                 "PGCAST_RECONCILE_AFTER: requeued once", row["broadcast_id"], row["requeued"])


def sweep_once(url: str) -> list[dict[str, Any]]:
    """Reclaim expired leases, mark lost handoffs unknown, finalize drained broadcasts."""
    with psycopg.connect(url, autocommit=True, **db.CONNECT_KWARGS) as conn:
        rows = sweep_conn(conn)
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        finished = [cur.execute(QUERIES["broadcast_counts"], {"id": r["broadcast_id"]}).fetchone()
                    for r in rows if r["finalized"]]
        starter.start_due(conn)  # and start the scheduled broadcasts whose time has come
    _log(rows, finished)
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
        if c is not None:
            log.info("broadcast %s finished %s: total %s, sent %s, failed %s, skipped %s, "
                     "unknown %s, cancelled %s", bid, *(c[k] for k in COUNTS))


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
            rows = await sweep_async(conn)
            finished = []
            for r in rows:
                if r["finalized"]:
                    got = await conn.execute(QUERIES["broadcast_counts"], {"id": r["broadcast_id"]})
                    finished.append(await got.fetchone())
            _log(rows, finished)
            await starter.start_due_async(conn)

    del sweep
    testsend.register(app, url)  # test sends ride on the same procrastinate worker
    if retention_days is not None:
        from pgcast.worker import retention

        retention.register(app, url, retention_days)
    return app
