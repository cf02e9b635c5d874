"""Fixtures: a real Postgres (DATABASE_URL, else an embedded one), fresh databases, processes."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests import support


@pytest.fixture(scope="session", autouse=True)
def pgcast_home() -> Iterator[Path]:
    """The tests' own PGCAST_HOME (outboxes and the like), never the user's data directory."""
    if os.environ.get("PGCAST_HOME"):
        yield Path(os.environ["PGCAST_HOME"])
        return
    base = Path(tempfile.mkdtemp(prefix="pgcast-home-"))
    os.environ["PGCAST_HOME"] = str(base)
    try:
        yield base
    finally:
        del os.environ["PGCAST_HOME"]
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of a server we may create databases on; an embedded one is stopped at the end."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from pgcast.sql import embedded

    base = Path(tempfile.mkdtemp(prefix="pgcast-test-"))
    os.chmod(base, 0o755)
    url = embedded.start(base)
    try:
        yield url
    finally:
        embedded.discard(base)


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    """A database migrated once; every test database is cloned from it."""
    from pgcast.sql import migrate

    name = f"pgcast_template_{uuid.uuid4().hex[:8]}"
    with support.connect(pg_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    with psycopg.connect(support.with_dbname(pg_server, name)) as conn:
        migrate.migrate(conn)
    try:
        yield name
    finally:
        with support.connect(pg_server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


@pytest.fixture
def db_url(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    with support.fresh_database(pg_server, template_db) as url:
        yield url


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """An autocommit dict-row connection to this test's database."""
    with support.connect(db_url) as c:
        yield c


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[support.Processes]:
    """Starts real pgcast processes; kills leftovers at teardown."""
    p = support.Processes(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[support.MotoServer]:
    """moto's SES server on loopback, for the whole session."""
    server = support.MotoServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def ses(moto_server: support.MotoServer) -> support.MotoServer:
    """The SES server, emptied for this test."""
    moto_server.reset()
    return moto_server
