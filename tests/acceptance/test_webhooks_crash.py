"""A real `pgcast worker` killed with SIGKILL in the middle of a webhook delivery loses
nothing: after its lease expires another worker delivers the same event again (same
Pgcast-Event-Id), then the rest, in order. A real local HTTP receiver."""

from __future__ import annotations

import signal
from typing import Any

import psycopg

from pgcast.sql import contacts, hooks
from tests import hookreceiver, support

Conn = psycopg.Connection[dict[str, Any]]
EVENTS = 6
ENV = {"PGCAST_PROVIDER": "null", "PGCAST_WEBHOOKS_ALLOW_HTTP": "1",
       "PGCAST_WEBHOOKS_ALLOW_PRIVATE": "1", "PGCAST_WEBHOOKS_LEASE": "3",
       "PGCAST_WEBHOOKS_TIMEOUT": "2", "PGCAST_WEBHOOKS_POLL": "0.1",
       "PGCAST_WEBHOOKS_RETRY_BASE": "0.1"}


def test_kill_9_mid_delivery_loses_nothing(conn: Conn, db_url: str,
                                           procs: support.Processes,
                                           monkeypatch: Any) -> None:
    monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_HTTP", "1")
    monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_PRIVATE", "1")
    support.seed_contacts(conn, EVENTS)
    with hookreceiver.running(delay=1.0) as rx:
        hooks.add(conn, "default", rx.url, ["contact.unsubscribed"], {"via": "test"})
        for i in range(EVENTS):
            contacts.unsubscribe(conn, "default", f"user{i}@example.com")
        order = [str(r["event_id"]) for r in conn.execute(
            "SELECT event_id FROM webhook_deliveries ORDER BY id").fetchall()]
        victim = procs.start(db_url, "worker", **ENV)
        support.wait_for(rx.started.is_set, timeout=60, what="a delivery in progress")
        procs.stop(victim, signal.SIGKILL)
        # nothing was recorded for the delivery the receiver was answering
        assert conn.execute("SELECT count(*) AS n FROM webhook_deliveries "
                            "WHERE status = 'delivered'").fetchone()["n"] <= 1
        procs.start(db_url, "worker", **ENV)
        support.wait_for(lambda: conn.execute(
            "SELECT bool_and(status = 'delivered') AS done FROM webhook_deliveries"
        ).fetchone()["done"], timeout=120, what="every delivery delivered")
        got = rx.ids()
    # every event arrived, first arrivals in commit order, and the one in flight at the
    # kill arrived again with the same id
    assert set(got) == set(order)
    assert list(dict.fromkeys(got)) == order
    assert len(got) > EVENTS
    assert max(got.count(i) for i in order) == 2
