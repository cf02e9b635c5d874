"""The async connection pool and the few ways routes talk to Postgres (named queries only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, LiteralString

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from api import errors, http
from sql import db as sql_db
from sql.queries import QUERIES

CHECKOUT_TIMEOUT = 5.0  # seconds a request waits for a pooled connection before a 503

Pool = AsyncConnectionPool[psycopg.AsyncConnection[DictRow]]


def make_pool(url: str, size: int) -> Pool:
    """A closed pool of autocommit dict-row connections; open it in the lifespan."""
    return AsyncConnectionPool(
        url, min_size=1, max_size=size, open=False, timeout=CHECKOUT_TIMEOUT,
        connection_class=psycopg.AsyncConnection[DictRow],
        kwargs={"autocommit": True, "row_factory": dict_row, **sql_db.CONNECT_KWARGS},
        name="pgcast-api")


def check_params(params: Mapping[str, Any]) -> None:
    """Refuse (BadParameter) a string Postgres cannot hold, wherever a route got it from.

    The backstop under the URL and body checks: a decoded cursor, a header, anything a route
    passes on is refused as bad input (400) instead of failing in the driver (a 500).
    """
    for value in params.values():
        _check(value)


def _check(value: Any) -> None:
    if isinstance(value, str):
        found = http.bad_text(value)
        if found:
            raise errors.BadParameter(f"a value holds {found}")
    elif isinstance(value, list | tuple):
        for item in value:
            _check(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check(key)
            _check(item)


def query(name: str) -> LiteralString:
    """A named statement from sql/."""
    return QUERIES[name]


async def one(pool: Pool, name: str, params: dict[str, Any]) -> DictRow | None:
    """The first row of a named query, holding a connection only for that statement."""
    async with pool.connection() as conn:
        check_params(params)
        cur = await conn.execute(QUERIES[name], params)
        return await cur.fetchone()


async def all_rows(pool: Pool, name: str, params: dict[str, Any]) -> list[DictRow]:
    """Every row of a named query."""
    async with pool.connection() as conn:
        check_params(params)
        cur = await conn.execute(QUERIES[name], params)
        return await cur.fetchall()


async def rowcount(pool: Pool, name: str, params: dict[str, Any]) -> int:
    """How many rows a named write touched."""
    async with pool.connection() as conn:
        check_params(params)
        cur = await conn.execute(QUERIES[name], params)
        return cur.rowcount

