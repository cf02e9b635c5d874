"""`pgcast api` runs on uvloop and httptools (pgcast's dependencies; uvicorn picks them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import support
from tests.integration import test_api_helpers as h

pytestmark = pytest.mark.acceptance


def test_the_api_process_serves_on_uvloop_and_httptools(
        db_url: str, procs: support.Processes) -> None:
    port = support.free_port()
    api = procs.start(db_url, "api", "--port", str(port), PGCAST_JWT_SECRET=h.SECRET)
    base = f"http://127.0.0.1:{port}"
    support.wait_for(lambda: h.api_up(base) or api.poll() is not None, timeout=30,
                     what="pgcast api")
    assert api.poll() is None, procs.log(api)
    # the shared objects the running process has mapped (Linux's /proc): the loop's and the parser's C code
    mapped = Path(f"/proc/{api.pid}/maps").read_text()
    assert "/uvloop/loop." in mapped, "the API is not running on uvloop"
    assert "/httptools/parser/parser." in mapped, "the API does not parse HTTP with httptools"
    procs.stop(api, timeout=60)
