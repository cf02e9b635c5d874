"""`pgcast api` runs on uvloop and httptools (pgcast's dependencies; uvicorn picks them), and
`pgcast worker` on uvloop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import support
from tests.integration import test_api_helpers as h

pytestmark = pytest.mark.acceptance


def mapped(pid: int) -> str:
    """The files a running process has mapped (Linux's /proc): its shared objects."""
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_api_process_serves_on_uvloop_and_httptools(
        db_url: str, procs: support.Processes) -> None:
    port = support.free_port()
    api = procs.start(db_url, "api", "--port", str(port), PGCAST_JWT_SECRET=h.SECRET)
    base = f"http://127.0.0.1:{port}"
    support.wait_for(lambda: h.api_up(base) or api.poll() is not None, timeout=30,
                     what="pgcast api")
    assert api.poll() is None, procs.log(api)
    # the loop's and the parser's C code, loaded by the running process
    loaded = mapped(api.pid)
    assert "/uvloop/loop." in loaded, "the API is not running on uvloop"
    assert "/httptools/parser/parser." in loaded, "the API does not parse HTTP with httptools"
    procs.stop(api, timeout=60)


def test_the_worker_process_runs_on_uvloop(
        db_url: str, conn: Any, procs: support.Processes) -> None:
    support.seed_contacts(conn, 3)
    bid = support.new_broadcast(conn)
    worker = procs.start(db_url, "worker", PGCAST_PROVIDER="null")
    support.wait_for(lambda: support.progress(conn, bid)["status"] == "sent", timeout=60,
                     what="the broadcast sent")
    assert worker.poll() is None, procs.log(worker)
    assert "/uvloop/loop." in mapped(worker.pid), "the worker is not running on uvloop"
    assert procs.stop(worker) == 0
