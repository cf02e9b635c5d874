"""Schemathesis fuzzes the OpenAPI document against the real app over HTTP: no 5xx."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi import checks as openapi_checks

from pgcast.api import openapi
from tests import support
from tests.integration import test_api_helpers as h

schema = schemathesis.openapi.from_dict(openapi.document())


@schema.hook
def filter_query(ctx: Any, query: Any) -> bool:
    """No query value the HTTP client drops (an empty list): the server never sees it, so a
    "schema-violating request accepted" would be about the client, not the app."""
    return not isinstance(query, dict) or all(v != [] for v in query.values())


@pytest.fixture(scope="module")
def server(pg_server: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    """`pgcast api` on a loopback port over a fresh database with a few rows in it."""
    procs = support.Processes(tmp_path_factory.mktemp("fuzz"))
    with support.fresh_database(pg_server, template_db) as db_url:
        with support.connect(db_url) as conn:
            support.seed_contacts(conn, 20, account=h.ACCOUNT)
            support.new_broadcast(conn, account=h.ACCOUNT)
            support.new_broadcast(conn, account=h.ACCOUNT, send=False)
        port = support.free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            proc = procs.start(db_url, "api", "--port", str(port), PGCAST_JWT_SECRET=h.SECRET)
            support.wait_for(lambda: h.api_up(url) or proc.poll() is not None, timeout=30,
                             what="pgcast api")
            assert proc.poll() is None, procs.log(proc)
            yield url
        finally:
            procs.cleanup()


def test_the_served_document_is_the_fuzzed_one(server: str) -> None:
    import json

    req = urllib.request.Request(f"{server}/openapi.json", headers=h.auth())
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.load(r) == openapi.document()


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz(case: Any, server: str) -> None:
    # Schema-valid data may still be refused with 422 for rules JSON Schema cannot say
    # (an RFC 5322 address, one-line subject, text or html required, our own cursors).
    case.call_and_validate(base_url=server, headers=h.auth(),
                           excluded_checks=[openapi_checks.positive_data_acceptance])
