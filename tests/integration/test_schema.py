"""Migrations: they add up to the declared schema, and migrate is idempotent and race-safe."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg

import schema
from sql import migrate
from tests import support

DESCRIBE = """
SELECT 'column' AS kind, table_name || '.' || column_name AS name,
       data_type || coalesce(' default ' || column_default, '') || ' null=' || is_nullable AS def
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'index', indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'constraint', conrelid::regclass || '.' || conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'view', viewname, definition FROM pg_views WHERE schemaname = 'public'
UNION ALL
SELECT 'function', p.oid::regprocedure::text, pg_get_functiondef(p.oid)
FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'trigger', tgrelid::regclass || '.' || tgname, pg_get_triggerdef(oid)
FROM pg_trigger WHERE NOT tgisinternal
ORDER BY 1, 2
"""


def describe(url: str) -> list[tuple[Any, ...]]:
    """pgcast's objects (not procrastinate's, not the migrations bookkeeping)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(DESCRIBE).fetchall()  # type: ignore[arg-type]
    return [r for r in rows if "procrastinate" not in r[1] and "schema_migrations" not in r[1]]


def test_migrations_add_up_to_the_declared_schema(pg_server: str) -> None:
    with support.fresh_database(pg_server, "template0") as migrated, \
            support.fresh_database(pg_server, "template0") as declared:
        with psycopg.connect(migrated) as conn:
            migrate.migrate(conn)
        with psycopg.connect(declared) as conn:
            conn.execute(schema.current())  # type: ignore[arg-type]
        got, want = describe(migrated), describe(declared)
        assert len(want) > 20
        assert got == want


def test_migrate_is_idempotent(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        assert migrate.migrate(conn) == []
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in schema.migrations()]


def test_two_migrates_at_once_are_safe(pg_server: str) -> None:
    with support.fresh_database(pg_server, "template0") as url:
        env = support.pgcast_env(url)
        runs = [subprocess.Popen([sys.executable, "-m", "bin.cli", "migrate"], cwd=support.ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
        outputs = [p.communicate(timeout=120) for p in runs]
        assert [p.returncode for p in runs] == [0, 0, 0], outputs
        applied = [out for out, _ in outputs if out.startswith("applied")]
        assert len(applied) == 1, outputs  # exactly one did the work, the others waited
        with psycopg.connect(url) as conn:
            n = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert n is not None and n[0] == len(schema.migrations())
