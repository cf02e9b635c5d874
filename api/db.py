"""The async connection pool and the few ways routes talk to Postgres (named queries only)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, LiteralString

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from pgcast.api import errors
from pgcast.sql import db as sql_db
from pgcast.sql.queries import QUERIES

CHECKOUT_TIMEOUT = 5.0  # seconds a request waits for a pooled connection before a 503
LOCK_WAIT = 5000  # ms a statement of ERASURE_LOCKED waits for a lock before a 503 (busy)

# The named statements that take the account's erasure lock (pgcast.erasure): shared by every
# writer that could bring an erased address back, exclusive in the erase, which holds it for as
# long as it runs (minutes for an account with millions of recipient rows). Each runs with its
# lock waits ended after LOCK_WAIT (psycopg LockNotAvailable: the app answers 503 busy,
# errors.LockBusy), instead of holding the request and its connection until the erase commits.
# A test checks the set against the functions that take the lock.
ERASURE_LOCKED = frozenset({
    "broadcast_send", "contact_erase", "contacts_lock", "contacts_upsert",
    "message_one_click_unsubscribe", "message_send", "signup", "test_send_queue"})

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


async def limit_lock_wait(conn: psycopg.AsyncConnection[DictRow]) -> None:
    """Bound every lock wait of conn's current transaction (or a pipeline's) to LOCK_WAIT."""
    await conn.execute(QUERIES["lock_wait_limit"], {"ms": LOCK_WAIT})


@contextlib.asynccontextmanager
async def _connection(pool: Pool, name: str) -> AsyncIterator[psycopg.AsyncConnection[DictRow]]:
    # A statement of ERASURE_LOCKED goes in a pipeline after the limit: both run in the implicit
    # transaction that ends at the pipeline's sync (the limit is SET LOCAL), in one round trip
    # (an explicit BEGIN ... COMMIT costs two more: bench.lock_wait).
    async with pool.connection() as conn:
        if name not in ERASURE_LOCKED:
            yield conn
            return
        async with conn.pipeline():
            await limit_lock_wait(conn)
            yield conn


async def one(pool: Pool, name: str, params: dict[str, Any]) -> DictRow | None:
    """The first row of a named query, holding a connection only for that statement."""
    async with _connection(pool, name) as conn:
        with bad_text_is_bad_input():
            cur = await conn.execute(QUERIES[name], params)
        return await cur.fetchone()


async def all_rows(pool: Pool, name: str, params: dict[str, Any]) -> list[DictRow]:
    """Every row of a named query."""
    async with _connection(pool, name) as conn:
        with bad_text_is_bad_input():
            cur = await conn.execute(QUERIES[name], params)
        return await cur.fetchall()


async def rowcount(pool: Pool, name: str, params: dict[str, Any]) -> int:
    """How many rows a named write touched."""
    async with _connection(pool, name) as conn:
        with bad_text_is_bad_input():
            cur = await conn.execute(QUERIES[name], params)
    return cur.rowcount  # after the pipeline's sync, when there is one

