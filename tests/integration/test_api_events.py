"""GET /broadcasts/{id}/events: progress on change, `done` at the end, no idle connection."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import psycopg

from pgcast.api import app as api_app
from pgcast.sql import broadcasts
from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]


async def _collect(db_url: str, bid: uuid.UUID, on_event: Any) -> list[tuple[str, Any]]:
    app = api_app.create_app(h.settings(), db_url)
    seen: list[tuple[str, Any]] = []

    def event(name: str, data: Any) -> None:
        seen.append((name, data))
        if name == "progress":
            stats = app.state.pool.get_stats()
            # the stream holds no pooled connection between two reads
            assert stats["pool_available"] == stats["pool_size"], stats
            on_event(len(seen), data)

    async with app.router.lifespan_context(app):
        await app.state.pool.wait()  # min_size ready: the pool will not grow mid-test
        with anyio.fail_after(60):
            status = await h.sse(app, f"/broadcasts/{bid}/events", h.auth(), event)
    return [("status", status), *seen]


def test_events_on_change_then_done(db_url: str, conn: Conn) -> None:
    support.seed_contacts(conn, 10, account=h.ACCOUNT)
    bid = support.new_broadcast(conn, account=h.ACCOUNT)

    def step(n: int, data: dict[str, Any]) -> None:
        # each change happens only after the stream reported the previous state
        if data["sent"] == 0 and data["status"] == "sending":
            conn.execute("UPDATE broadcast_recipients SET status = 'sent', worker = 'w' "
                         "WHERE broadcast_id = %s "
                         "AND contact_id IN (SELECT contact_id FROM broadcast_recipients "
                         "WHERE broadcast_id = %s ORDER BY contact_id LIMIT 3)", (bid, bid))
            conn.execute("UPDATE broadcasts SET sent = 3 WHERE id = %s", (bid,))
        elif data["sent"] == 3 and data["status"] == "sending":
            broadcasts.cancel(conn, h.ACCOUNT, bid)

    seen = anyio.run(_collect, db_url, bid, step)
    assert seen[0] == ("status", 200)
    events = [(name, d["status"], d["sent"], d["cancelled"]) for name, d in seen[1:]]
    assert events == [("progress", "sending", 0, 0), ("progress", "sending", 3, 0),
                      ("progress", "cancelled", 3, 7), ("done", "cancelled", 3, 7)]
    support.assert_counters_true(conn, bid)
    final = seen[-1][1]
    assert final["pending"] == 0 and final["eta_seconds"] == 0


def test_a_terminal_broadcast_streams_one_progress_and_done(db_url: str, conn: Conn) -> None:
    bid = support.new_broadcast(conn, account=h.ACCOUNT, send=False)
    broadcasts.cancel(conn, h.ACCOUNT, bid)
    seen = anyio.run(_collect, db_url, bid, lambda n, d: None)
    assert [(name, d.get("status")) for name, d in seen[1:]] == [("progress", "cancelled"),
                                                                  ("done", "cancelled")]


def test_a_deleted_draft_ends_the_stream(db_url: str, conn: Conn) -> None:
    bid = support.new_broadcast(conn, account=h.ACCOUNT, send=False)

    def delete(n: int, data: dict[str, Any]) -> None:
        conn.execute("DELETE FROM broadcasts WHERE id = %s", (bid,))

    seen = anyio.run(_collect, db_url, bid, delete)
    assert [name for name, _ in seen[1:]] == ["progress", "gone"]


def test_events_of_another_account_are_404(db_url: str, conn: Conn) -> None:
    bid = support.new_broadcast(conn, account="other", send=False)
    with h.client(db_url) as api:
        r = api.get(f"/broadcasts/{bid}/events", headers=h.auth())
    assert r.status_code == 404
