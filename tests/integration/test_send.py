"""Send = snapshot (invariant 1), and the CAS transitions with their audit log."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from pgcast.sql import broadcasts, contacts, errors
from tests import support

Conn = psycopg.Connection[dict[str, Any]]


def test_snapshot_is_taken_once_and_ignores_later_segment_changes(conn: Conn) -> None:
    support.seed_contacts(conn, 50, tag="vip")
    support.seed_contacts(conn, 30, start=100)  # untagged
    conn.execute("UPDATE contacts SET unsubscribed_at = now() WHERE email = 'user3@example.com'")
    bid = support.new_broadcast(conn, tag="vip")
    assert support.progress(conn, bid)["total"] == 49
    # after send: a new vip joins, a vip loses the tag, an untagged contact gains it
    support.seed_contacts(conn, 1, tag="vip", start=500)
    conn.execute("UPDATE contacts SET tags = '{}' WHERE email = 'user1@example.com'")
    conn.execute("UPDATE contacts SET tags = '{vip}' WHERE email = 'user100@example.com'")
    rows = conn.execute("SELECT email FROM broadcast_recipients WHERE broadcast_id = %s",
                        (bid,)).fetchall()
    emails = {r["email"] for r in rows}
    assert len(emails) == 49
    assert "user1@example.com" in emails and "user3@example.com" not in emails
    assert "user500@example.com" not in emails and "user100@example.com" not in emails
    assert support.progress(conn, bid)["total"] == 49


def test_whole_account_excludes_unsubscribed_and_other_accounts(conn: Conn) -> None:
    support.seed_contacts(conn, 20)
    support.seed_contacts(conn, 7, account="other")
    contacts.unsubscribe(conn, "default", "USER4@example.com")
    bid = support.new_broadcast(conn)
    assert support.progress(conn, bid)["total"] == 19


def test_zero_recipients_is_refused_unless_allowed_then_ends_sent_at_once(conn: Conn) -> None:
    support.seed_contacts(conn, 5)
    bid = support.new_broadcast(conn, send=False, tag="nobody")
    refused = broadcasts.send(conn, "default", bid)
    assert refused["success"] is False and refused["status"] == "empty"
    assert "'nobody'" in refused["message"]
    assert support.progress(conn, bid)["status"] == "draft"
    assert conn.execute("SELECT to_regclass(%s) AS part",
                        (f"broadcast_recipients_{bid.hex}",)).fetchone() == {"part": None}
    result = broadcasts.send(conn, "default", bid, allow_empty=True)
    assert result == {"success": True, "status": "sent", "queued": 0,
                      "message": "Broadcast has no recipients; marked sent"}
    p = support.progress(conn, bid)
    assert (p["status"], p["total"]) == ("sent", 0)
    assert p["finished_at"] is not None


def test_send_twice_changes_nothing_the_second_time(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = support.new_broadcast(conn)
    again = broadcasts.send(conn, "default", bid)
    assert again["success"] is False and again["status"] == "sending"
    assert support.progress(conn, bid)["total"] == 10
    n = conn.execute("SELECT count(*) AS n FROM broadcast_recipients").fetchone()
    assert n is not None and n["n"] == 10


def test_another_accounts_broadcast_is_not_found(conn: Conn) -> None:
    support.seed_contacts(conn, 3)
    bid = support.new_broadcast(conn, send=False)
    with pytest.raises(errors.NotFound):
        broadcasts.send(conn, "intruder", bid)
    with pytest.raises(errors.NotFound):
        broadcasts.cancel(conn, "intruder", bid)
    assert support.progress(conn, bid)["status"] == "draft"


def test_every_transition_is_in_the_audit_log(conn: Conn) -> None:
    support.seed_contacts(conn, 3)
    bid = support.new_broadcast(conn)
    assert broadcasts.pause(conn, "default", bid)["success"]
    assert broadcasts.resume(conn, "default", bid)["success"]
    assert broadcasts.cancel(conn, "default", bid)["success"]
    assert broadcasts.resume(conn, "default", bid)["success"] is False  # terminal: unchanged
    row = broadcasts.get(conn, "default", bid)
    steps = [(e["action"], e["from"], e["to"]) for e in row["audit_log"]]
    assert steps == [("create", None, "draft"), ("send", "draft", "sending"),
                     ("pause", "sending", "paused"), ("resume", "paused", "sending"),
                     ("cancel", "sending", "cancelled")]
    assert all(e["at"] for e in row["audit_log"])
    assert row["epoch"] == 2


def test_bad_broadcast_input_is_refused(conn: Conn) -> None:
    for kwargs in ({"subject": "", "from_address": "a@example.com", "text": "x"},
                   {"subject": "S", "from_address": "nope", "text": "x"},
                   {"subject": "S", "from_address": "a@example.com"},
                   {"subject": "S\nBcc: x@example.com", "from_address": "a@example.com",
                    "text": "x"}):
        with pytest.raises(errors.InvalidInput):
            broadcasts.create(conn, "default", **kwargs)
    n = conn.execute("SELECT count(*) AS n FROM broadcasts").fetchone()
    assert n is not None and n["n"] == 0


def test_cancel_a_terminal_broadcast_answers_false(conn: Conn) -> None:
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn)
    first = broadcasts.cancel(conn, "default", bid)
    assert first["success"] and first["alreadyQueued"] == 0
    second = broadcasts.cancel(conn, "default", bid)
    assert second["success"] is False and second["status"] == "cancelled"
    p = support.assert_counters_true(conn, bid)
    assert p["cancelled"] == 2


def test_unknown_id(conn: Conn) -> None:
    with pytest.raises(errors.NotFound):
        broadcasts.progress(conn, "default", uuid.uuid4())
