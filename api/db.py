"""The async connection pool and the few ways routes talk to Postgres (named queries only)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, LiteralString

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from pgcast.api import errors
from pgcast.sql import db as sql_db
from pgcast.sql.queries import QUERIES

CHECKOUT_TIMEOUT = 5.0  # seconds a request waits for a pooled connection before a 503

Pool = AsyncConnectionPool[psycopg.AsyncConnection[DictRow]]


def make_pool(url: str, size: int) -> Pool:
    """A closed pool of autocommit dict-row connections; open it in the lifespan."""
    return AsyncConnectionPool(
        url, min_size=1, max_size=size, open=False, timeout=CHECKOUT_TIMEOUT,
        connection_class=psycopg.AsyncConnection[DictRow],
        kwargs={"autocommit": True, "row_factory": dict_row, **sql_db.CONNECT_KWARGS},
        name="pgcast-api")


@contextlib.contextmanager
def bad_text_is_bad_input() -> Iterator[None]:
    """A value the driver refuses to send (NUL, a lone surrogate) is a 400, not a 500."""
    # the backstop under the URL and body checks, free when nothing is wrong: a decoded
    # cursor, or anything else a route passes on
    try:
        yield
    except UnicodeEncodeError:
        raise errors.BadParameter("a value is not valid Unicode (a lone surrogate)") from None
    except psycopg.DataError as exc:
        if exc.sqlstate is not None:  # the server's own refusal: not this case
            raise
        raise errors.BadParameter("a value holds NUL") from None


def query(name: str) -> LiteralString:
    """A named statement from sql/."""
    return QUERIES[name]


async def one(pool: Pool, name: str, params: dict[str, Any]) -> DictRow | None:
    """The first row of a named query, holding a connection only for that statement."""
    async with pool.connection() as conn:
        with bad_text_is_bad_input():
            cur = await conn.execute(QUERIES[name], params)
        return await cur.fetchone()


async def all_rows(pool: Pool, name: str, params: dict[str, Any]) -> list[DictRow]:
    """Every row of a named query."""
    async with pool.connection() as conn:
        with bad_text_is_bad_input():
            cur = await conn.execute(QUERIES[name], params)
        return await cur.fetchall()


async def rowcount(pool: Pool, name: str, params: dict[str, Any]) -> int:
    """How many rows a named write touched."""
    async with pool.connection() as conn:
        with bad_text_is_bad_input():
            cur = await conn.execute(QUERIES[name], params)
        return cur.rowcount

