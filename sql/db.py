"""Which Postgres to use, and connections to it."""

from __future__ import annotations

import os

import psycopg
from psycopg.rows import dict_row

from sql import embedded


def database_url() -> str:
    """DATABASE_URL when set (never starts a server); else the embedded server's URL."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    return embedded.start()


def connect(url: str | None = None, *, autocommit: bool = False) -> psycopg.Connection[dict]:  # type: ignore[type-arg]
    """A synchronous connection with dict rows."""
    return psycopg.connect(url or database_url(), autocommit=autocommit, row_factory=dict_row)
