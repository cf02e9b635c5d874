"""The engine's statements: run a named query on the shared pool, riding out outages."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgcast.sql.queries import QUERIES

log = logging.getLogger("pgcast.worker")

DB_RETRY_MAX = 5.0  # seconds: the longest pause between attempts to reach Postgres
UNREACHABLE = (psycopg.OperationalError, psycopg.errors.AdminShutdown)


class Db:
    """Named queries over one process's pool."""

    def __init__(self, pool: AsyncConnectionPool, stopping: asyncio.Event, lease: float) -> None:
        self.pool = pool
        self.stopping = stopping
        self.lease = lease

    async def q(self, name: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one named statement; its rows (none for a statement without a result)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(QUERIES[name], params)
            return await cur.fetchall() if cur.description else []

    async def dicts(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """A named query's rows as dicts (read by column name: columns may be added)."""
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            await cur.execute(QUERIES[name], params)
            return await cur.fetchall()

    async def table(self, name: str, params: dict[str, Any]) -> Rows:
        """A named query's rows as psycopg's tuples, read by column name (Rows): no dict
        per row, and the rows in binary (no number or flag parsed from text; issue 32: a
        claim's 500 rows). Its columns must be of types psycopg loads in binary (numbers,
        text, booleans, uuid, json, arrays of them), as the claims' are."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(QUERIES[name], params, binary=True)
            names = [c.name for c in cur.description or ()]
            return Rows(names, await cur.fetchall())

    async def q_retry(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run a statement that must happen (records, releases), riding out outages.

        Once the worker is stopping it keeps trying for one lease at most: after that the
        sweeper owns the rows anyway (claimed rows go back to pending, sending rows become
        unknown), and a stop must not hang on a database that is gone.
        """
        delay = 0.1
        give_up: float | None = None
        while True:
            try:
                return await self.q(name, params)
            except UNREACHABLE as exc:
                if self.stopping.is_set():
                    give_up = give_up or time.monotonic() + self.lease
                    if time.monotonic() > give_up:
                        log.error("giving up %s while stopping: %s", name, exc)
                        raise
                log.warning("postgres unreachable during %s (%s); retrying in %.1fs",
                            name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(DB_RETRY_MAX, delay * 2)


class Rows:
    """A statement's rows as tuples, with their columns by name."""

    __slots__ = ("_columns", "names", "rows")

    def __init__(self, names: list[str], rows: list[tuple[Any, ...]]) -> None:
        self.names = {n: i for i, n in enumerate(names)}
        self.rows = rows
        self._columns: list[tuple[Any, ...]] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[Any]:
        """Every row's value of one column, in order (the rows are turned into columns once,
        by the first call)."""
        columns = self._columns
        if columns is None:
            columns = self._columns = (list(zip(*self.rows, strict=True)) if self.rows
                                       else [() for _ in self.names])
        return list(columns[self.names[name]])

    def first(self, name: str) -> Any:
        """The first row's value of one column (there must be a row)."""
        return self.rows[0][self.names[name]]
