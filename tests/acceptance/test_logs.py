"""`pgcast worker` and `pgcast api` with PGCAST_LOG_FORMAT=json write JSON lines."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from pgcast.sql.queries import QUERIES
from tests import support
from tests.integration import test_api_helpers as h

pytestmark = pytest.mark.acceptance
Conn = psycopg.Connection[dict[str, Any]]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed; a line that is not JSON fails the test."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_worker_logs_json_with_the_broadcast_id(
        db_url: str, conn: Conn, procs: support.Processes) -> None:
    support.seed_contacts(conn, 20)
    bid = support.new_broadcast(conn)
    # a dead worker's expired claim: the sweeper logs the broadcast it reclaims rows of
    conn.execute(QUERIES["claim"], {"id": bid, "limit": 20, "token": uuid.uuid4(),
                                    "worker": "gone:1", "lease": 0.001, "after": 0})
    worker = procs.start(db_url, "worker", "--sweep-every", "1", PGCAST_PROVIDER="null",
                         PGCAST_LOG_LEVEL="INFO", PGCAST_LOG_FORMAT="json")
    support.wait_for(lambda: support.progress(conn, bid)["status"] == "sent", timeout=60,
                     every=0.2, what="the broadcast sent")
    assert procs.stop(worker) == 0
    lines = json_lines(procs.log(worker))
    logged = [x for x in lines if "logger" in x]
    assert {"timestamp", "level", "logger", "message"} <= set(logged[0])
    assert any(x["logger"] == "pgcast.worker" and "started" in x["message"] for x in logged)
    swept = [x for x in logged if x["logger"] == "pgcast.sweeper"]
    assert swept and all(x["broadcast_id"] == str(bid) for x in swept), logged


def test_api_logs_json_and_refuses_an_unknown_format(
        db_url: str, procs: support.Processes) -> None:
    bad = support.pgcast(db_url, "api", check=False, env=support.pgcast_env(
        db_url, PGCAST_JWT_SECRET=h.SECRET, PGCAST_LOG_FORMAT="xml"))
    assert bad.returncode == 2 and "text or json" in bad.stderr
    port = support.free_port()
    api = procs.start(db_url, "api", "--port", str(port), PGCAST_JWT_SECRET=h.SECRET,
                      PGCAST_LOG_LEVEL="INFO", PGCAST_LOG_FORMAT="json",
                      PGCAST_API_ACCESS_LOG="1")
    base = f"http://127.0.0.1:{port}"
    support.wait_for(lambda: h.api_up(base) or api.poll() is not None, timeout=30,
                     what="pgcast api")
    support.wait_for(lambda: "GET /healthz" in procs.log(api), timeout=30, what="access log")
    procs.stop(api, timeout=60)
    lines = json_lines(procs.log(api))
    assert any(x["logger"] == "uvicorn.access" and "GET /healthz" in x["message"]
               for x in lines)
    assert all({"timestamp", "level", "logger", "message"} <= set(x) for x in lines), lines


def test_worker_and_retention_refuse_an_unknown_format(db_url: str) -> None:
    for args in (["worker", "--once"], ["retention", "--dry-run"]):
        done = support.pgcast(db_url, *args, check=False, env=support.pgcast_env(
            db_url, PGCAST_PROVIDER="null", PGCAST_LOG_FORMAT="yaml"))
        assert done.returncode == 2 and "text or json" in done.stderr, (args, done.stderr)
