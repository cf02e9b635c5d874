"""Connection hygiene towards the provider (issue 25): a worker opens its connections a few
at a time, so an endpoint or proxy that cannot accept many at once (the standard library's
listen backlog of 5) never resets one after a request was written, and no recipient ends
`unknown` for it. Real `pgcast worker` processes, real boto3, moto's SES behind
tests.faultproxy (a ThreadingHTTPServer: backlog 5) that throttles 20 % of the calls."""

from __future__ import annotations

import email.utils
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests import faultproxy, support

pytestmark = pytest.mark.acceptance

Conn = psycopg.Connection[dict[str, Any]]
SENDER = "news@example.com"
RECIPIENTS = 1000
WAIT = 300.0  # seconds: generous upper bound for the broadcast to finish


@pytest.fixture
def proxy(ses: support.MotoServer) -> Iterator[faultproxy.FaultProxy]:
    """A throttling proxy with the standard library's default listen backlog, owned here."""
    ses.verify(SENDER)
    with faultproxy.running(ses.url) as p:
        assert p.server.request_queue_size == 5  # socketserver's default backlog
        yield p


def delivered(ses: support.MotoServer) -> Counter[str]:
    return Counter(email.utils.parseaddr(to)[1] for m in ses.messages()
                   for to in m["destinations"]["ToAddresses"])


def exit_line(procs: support.Processes, proc: Any) -> dict[str, Any]:
    """The worker's JSON exit line (after a SIGTERM)."""
    assert procs.stop(proc) == 0
    line = [x for x in procs.log(proc).splitlines() if x.startswith("{")][-1]
    return dict(json.loads(line))


def test_two_default_workers_through_a_throttling_proxy_with_a_small_backlog_leave_no_unknown(
        db_url: str, conn: Conn, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy) -> None:
    proxy.set_rules(faultproxy.throttled(every=5))  # 20 % of SendEmail calls: 429
    support.seed_contacts(conn, RECIPIENTS)
    env = {**ses.env(), **proxy.env(), "PGCAST_PROVIDER": "ses", "PGCAST_RATE": "0"}
    workers = [procs.start(db_url, "worker", **env) for _ in range(2)]  # default flags
    bid = support.new_broadcast(conn, from_address=SENDER)
    support.wait_for(lambda: support.progress(conn, bid)["status"] in ("sent", "failed",
                                                                        "paused"),
                     timeout=WAIT, what="the broadcast to finish")
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["sent"], p["failed"], p["unknown"]) == ("sent", RECIPIENTS, 0, 0), p
    counts = delivered(ses)
    assert len(counts) == RECIPIENTS and set(counts.values()) == {1}
    assert proxy.forwarded_sends == RECIPIENTS  # each recipient reached SES once
    lines = [exit_line(procs, w) for w in workers]
    opened = [line["connections"]["opened"] for line in lines]
    assert all(n >= 1 for n in opened), lines
    assert sum(line["connections"]["unknown_after_write"] for line in lines) == 0, lines
