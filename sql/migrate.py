"""Applies schema/ migrations and procrastinate's schema, under an advisory lock."""

from __future__ import annotations

from typing import Any, cast

import psycopg
from procrastinate import schema as procrastinate_schema

from pgcast import schema
from pgcast.sql.queries import QUERIES


def migrate(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply what is missing, in one transaction; return the names applied. Idempotent."""
    applied: list[str] = []
    with conn.transaction():
        # two `pgcast migrate` at once: the second waits here, then finds nothing to do
        conn.execute(QUERIES["migrate_lock"])
        conn.execute(QUERIES["migrations_table"])
        done = {row_value(r, "version") for r in conn.execute(QUERIES["migrations_applied"])}
        for m in schema.migrations():
            if m.version in done:
                continue
            conn.execute(cast(Any, m.sql))
            conn.execute(QUERIES["migration_record"], {"version": m.version, "name": m.name})
            applied.append(f"{m.version:04d}_{m.name}")
        row = conn.execute(QUERIES["procrastinate_installed"]).fetchone()
        if not row_value(row, "installed"):
            conn.execute(cast(Any, procrastinate_schema.SchemaManager.get_schema()))
            applied.append("procrastinate")
    return applied


def row_value(row: Any, key: str) -> Any:
    """A column of a dict row or the first column of a tuple row."""
    if row is None:
        return None
    return row[key] if isinstance(row, dict) else row[0]
