"""Prometheus metrics of `pgcast api` and `pgcast worker`, scraped while a broadcast sends."""

from __future__ import annotations

import urllib.request
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import support
from tests.integration import test_api_helpers as h

pytestmark = pytest.mark.acceptance
Conn = psycopg.Connection[dict[str, Any]]
N = 900  # recipients: three seconds at RATE
RATE = "300"  # emails/s


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The endpoint's text, and every sample by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_counters_add_up_to_the_rows(db_url: str, conn: Conn, procs: support.Processes) -> None:
    support.seed_contacts(conn, N)
    bid = support.new_broadcast(conn, send=False)
    api_port, metrics_ports = support.free_port(), [support.free_port() for _ in range(3)]
    api = procs.start(db_url, "api", "--port", str(api_port), "--metrics-addr",
                      f"127.0.0.1:{metrics_ports[0]}", PGCAST_JWT_SECRET=h.SECRET)
    base = f"http://127.0.0.1:{api_port}"
    support.wait_for(lambda: h.api_up(base) or api.poll() is not None, timeout=30,
                     what="pgcast api")
    assert api.poll() is None, procs.log(api)
    workers = [procs.start(db_url, "worker", "--concurrency", "2", "--batch-size", "100",
                           PGCAST_PROVIDER="null", PGCAST_RATE=RATE,
                           PGCAST_METRICS_ADDR=f"127.0.0.1:{port}")
               for port in metrics_ports[1:]]
    auth = {"Authorization": f"Bearer {h.token(account='default')}"}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as http:
        assert http.post(f"/broadcasts/{bid}/send").json()["queued"] == N
        # the queue as Postgres sees it, while the broadcast sends
        support.wait_for(lambda: 0 < support.progress(conn, bid)["sent"] < N // 2, timeout=60,
                         every=0.02, what="the broadcast under way")
        _, during = scrape(metrics_ports[0])
        assert total(during, "pgcast_database_up") == 1
        assert total(during, "pgcast_broadcasts", status="sending") == 1
        assert 0 < total(during, "pgcast_queue_pending") <= N
        support.wait_for(lambda: support.progress(conn, bid)["status"] == "sent", timeout=60,
                         every=0.2, what="the broadcast sent")
        # the API's own port serves no metrics
        assert "pgcast_" not in http.get("/metrics").text

    texts, scraped = [], []
    for port in metrics_ports[1:]:
        text, samples = scrape(port)
        texts.append(text)
        scraped.append(samples)
    p = support.assert_counters_true(conn, bid)
    assert p["sent"] == N
    assert sum(total(s, "pgcast_messages_total", outcome="sent") for s in scraped) == N
    assert sum(total(s, "pgcast_messages_total") for s in scraped) == N  # no other outcome
    assert sum(total(s, "pgcast_handoff_group_size_sum") for s in scraped) == N
    # `null` takes a group's messages in one call (send_many): a call per handoff
    assert sum(total(s, "pgcast_provider_seconds_count") for s in scraped) == sum(
        total(s, "pgcast_handoff_group_size_count") for s in scraped)
    for s in scraped:
        assert total(s, "pgcast_provider_calls_in_flight") == 0
        assert total(s, "pgcast_statement_seconds_count", statement="claim") > 0
        assert total(s, "pgcast_statement_seconds_count", statement="record") > 0
    # 300/s from a bucket of 15: the loops waited for tokens
    assert sum(total(s, "pgcast_token_waits_total") for s in scraped) > 0
    api_text, after = scrape(metrics_ports[0])
    assert total(after, "pgcast_queue_pending") == 0
    assert total(after, "pgcast_queue_in_flight") == 0
    assert total(after, "pgcast_api_requests_total", method="POST",
                 route="/broadcasts/{id}/send", status="200") == 1
    # no label grows with history: no broadcast, contact or address in any series
    for text in (*texts, api_text):
        assert str(bid) not in text and "@example.com" not in text
    for w in workers:
        assert procs.stop(w) == 0


def test_metrics_never_on_the_api_port_and_the_address_is_checked(db_url: str) -> None:
    port = support.free_port()
    bad = support.pgcast(db_url, "api", "--port", str(port), "--metrics-addr",
                         f"127.0.0.1:{port}", check=False,
                         env=support.pgcast_env(db_url, PGCAST_JWT_SECRET=h.SECRET))
    assert bad.returncode == 2 and "API's own port" in bad.stderr
    bad = support.pgcast(db_url, "worker", "--once", "--metrics-addr", "nowhere", check=False,
                         env=support.pgcast_env(db_url, PGCAST_PROVIDER="null"))
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
