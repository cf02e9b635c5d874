"""Review of issues 26-30 (messages, segments, subscribers, webhooks): defects found in the
integration, each reproduced here first. The message fence for marketing mail (unconfirmed
contacts), and what an erase leaves of an address in the messages and their events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from tests.integration.test_messages import deliver, sent_files, status

Conn = psycopg.Connection[dict[str, Any]]

SEND_CAT = ("SELECT pgcast_send_message('default', %s, 'Hello', 'Hi', NULL, "
            "'shop@example.com', %s, %s) AS id")


def _send(conn: Conn, to: str, category: str, key: str | None = None) -> Any:
    row = conn.execute(SEND_CAT, (to, key, category)).fetchone()
    assert row is not None
    return row["id"]


def test_a_marketing_message_never_reaches_an_unconfirmed_contact(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    # signed up on a form, never confirmed: no marketing mail, but its confirmation and
    # transactional mail still go
    conn.execute("INSERT INTO contacts (account, email, confirmed_at) "
                 "VALUES ('default', 'ann@example.com', NULL)")
    ids = {c: _send(conn, "ann@example.com", c)
           for c in ("marketing", "transactional", "confirmation")}
    deliver(db_url, tmp_path)
    row = status(conn, ids["marketing"])
    assert row["status"] == "skipped" and row["error"] == "unconfirmed", row
    assert status(conn, ids["transactional"])["status"] == "sent"
    assert status(conn, ids["confirmation"])["status"] == "sent"
    assert str(ids["marketing"]) not in sent_files(tmp_path)
