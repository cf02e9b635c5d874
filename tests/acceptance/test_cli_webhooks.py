"""`pgcast webhooks add|list|rotate-secret|deliveries|redeliver|enable|remove`, real processes."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from pgcast.sql import contacts
from tests import support

Conn = psycopg.Connection[dict[str, Any]]


def run(db_url: str, *args: str, check: bool = True) -> Any:
    done = support.pgcast(db_url, "webhooks", *args, check=check)
    return json.loads(done.stdout) if done.returncode == 0 else done


def test_webhooks_commands(conn: Conn, db_url: str) -> None:
    added = run(db_url, "add", "https://hooks.example.com/in", "--events",
                "contact.unsubscribed,broadcast.sent", "broadcast.failed", "--account", "acme")
    assert added["secret"].startswith("whsec_")
    assert added["events"] == ["contact.unsubscribed", "broadcast.sent", "broadcast.failed"]
    listed = run(db_url, "list", "--account", "acme")["webhooks"]
    assert [w["id"] for w in listed] == [added["id"]] and "secret" not in listed[0]
    assert run(db_url, "list")["webhooks"] == []  # the default account has none
    rotated = run(db_url, "rotate-secret", added["id"], "--account", "acme")
    assert rotated["secret"] != added["secret"]

    support.seed_contacts(conn, 1, account="acme")
    contacts.unsubscribe(conn, "acme", "user0@example.com", source="cli")
    log = run(db_url, "deliveries", added["id"], "--account", "acme")["deliveries"]
    assert [d["event_type"] for d in log] == ["contact.unsubscribed"]
    again = run(db_url, "redeliver", added["id"], str(log[0]["id"]), "--account", "acme")
    assert again["event_id"] == log[0]["event_id"]
    assert run(db_url, "enable", added["id"], "--account", "acme")["enabled"] is True

    refused = run(db_url, "add", "https://10.0.0.1/x", "--events", "*", check=False)
    assert refused.returncode == 2 and "private" in refused.stderr
    unknown = run(db_url, "add", "https://hooks.example.com/", "--events", "nope", check=False)
    assert unknown.returncode == 2 and "unknown event type" in unknown.stderr

    assert run(db_url, "remove", added["id"], "--account", "acme")["id"] == added["id"]
    gone = run(db_url, "remove", added["id"], "--account", "acme", check=False)
    assert gone.returncode == 2 and "no webhook endpoint" in gone.stderr
