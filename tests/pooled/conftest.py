"""PgBouncer (transaction pooling) in front of the test server: `make test-pg15` runs this ring."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import support


@pytest.fixture(scope="session")
def pgbouncer(pg_server: str) -> Iterator[support.PgBouncer]:
    """Debian's PgBouncer 1.18 in transaction mode, for the whole session."""
    bouncer = support.PgBouncer(pg_server)
    try:
        yield bouncer
    finally:
        bouncer.close()
