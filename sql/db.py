"""Which Postgres to use, and connections to it."""

from __future__ import annotations

import os
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgcast.sql import embedded
from pgcast.sql.queries import QUERIES

# Every pgcast connection runs its statements unprepared: PgBouncer < 1.21 in transaction
# mode hands each transaction to any server connection, where a statement psycopg prepared
# on another one does not exist. Our statements are function calls whose plans plpgsql
# caches anyway, so preparing them saved nothing measurable.
CONNECT_KWARGS: dict[str, Any] = {"prepare_threshold": None}


def database_url() -> str:
    """DATABASE_URL when set (never starts a server); else the embedded server's URL."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    return embedded.start()


def connect(url: str | None = None, *, autocommit: bool = False) -> psycopg.Connection[dict]:  # type: ignore[type-arg]
    """A synchronous connection with dict rows."""
    return psycopg.connect(url or database_url(), autocommit=autocommit, row_factory=dict_row,
                           **CONNECT_KWARGS)


def behind_pooler(url: str) -> bool:
    """Whether `url` reaches Postgres through a pooler such as PgBouncer.

    A pooler answers the startup with a backend key of its own, so the process id the
    connection announced is not the backend that runs its statements.
    """
    with psycopg.connect(url, autocommit=True, **CONNECT_KWARGS) as conn:
        row = conn.execute(QUERIES["backend_pid"]).fetchone()
        return row is None or int(row[0]) != conn.info.backend_pid


def listen_url(url: str) -> str | None:
    """Where LISTEN and procrastinate's worker connect (a session of their own): the
    PGCAST_LISTEN_URL, else `url` when it is a direct connection; None: poll instead."""
    explicit = os.environ.get("PGCAST_LISTEN_URL", "").strip()
    if explicit:
        return explicit
    return None if behind_pooler(url) else url
