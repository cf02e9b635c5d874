"""PGCAST_FORM_RATE is counted in each `pgcast api` process's memory (docs/subscribers.md): two
real processes on one database each allow the rate to the same client, and a restarted
process starts its count over."""

from __future__ import annotations

import subprocess
import uuid

import httpx

from tests import support
from tests.integration import test_api_helpers as h

FORM = uuid.uuid4()  # no such form: 404 until the limit answers 429
URLENCODED = {"Content-Type": "application/x-www-form-urlencoded"}


def _start(procs: support.Processes, db_url: str) -> tuple[str, subprocess.Popen[str]]:
    port = support.free_port()
    base = f"http://127.0.0.1:{port}"
    proc = procs.start(db_url, "api", "--port", str(port), PGCAST_JWT_SECRET=h.SECRET,
                       PGCAST_FORM_RATE="2")
    support.wait_for(lambda: h.api_up(base) or proc.poll() is not None, timeout=30,
                     what="pgcast api")
    assert proc.poll() is None, procs.log(proc)
    return base, proc


def _codes(base: str, n: int) -> list[int]:
    with httpx.Client(base_url=base, timeout=30) as http:
        return [http.post(f"/f/{FORM}", content=b"email=x", headers=URLENCODED).status_code
                for _ in range(n)]


def test_each_api_process_counts_a_client_on_its_own(
        db_url: str, procs: support.Processes) -> None:
    one, first = _start(procs, db_url)
    two, _ = _start(procs, db_url)
    assert _codes(one, 3) == [404, 404, 429]
    assert _codes(two, 3) == [404, 404, 429]  # the same client, the other process: 2 more
    procs.stop(first)
    again, _ = _start(procs, db_url)
    assert _codes(again, 1) == [404]  # a new process: the count starts over
