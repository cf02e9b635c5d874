"""The periodic sweeper, as a procrastinate periodic task run inside the worker processes."""

from __future__ import annotations

import logging
from typing import Any

import procrastinate
import psycopg

from sql.queries import QUERIES
from worker import starter, testsend

log = logging.getLogger("pgcast.sweeper")

QUEUE = "pgcast"


def sweep_conn(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """One sweep on an autocommit connection: one broadcast per transaction."""
    done: list[dict[str, Any]] = []
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    ids = [r["id"] for r in cur.execute(QUERIES["sweep_candidates"]).fetchall()]
    for bid in ids:
        done.extend(dict(r) for r in cur.execute(QUERIES["sweep_one"], {"id": bid}).fetchall())
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
    return done


def sweep_once(url: str) -> list[dict[str, Any]]:
    """Reclaim expired leases, mark lost handoffs unknown, finalize drained broadcasts."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = sweep_conn(conn)
        starter.start_due(conn)  # and start the scheduled broadcasts whose time has come
    _log(rows)
    return rows


def _log(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        log.info("sweep %s: reclaimed %s, unknown %s, finalized %s", row["broadcast_id"],
                 row["reclaimed"], row["unknown"], row["finalized"])


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
            _log(await sweep_async(conn))
            await starter.start_due_async(conn)

    del sweep
    testsend.register(app, url)  # test sends ride on the same procrastinate worker
    return app
