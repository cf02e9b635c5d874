"""A Rendering Failure event fails the `sent` row of its message (migration 0029,
pgcast_ses_event_v3): by SendBulkEmail SES answers SUCCESS and renders the entry afterwards,
so a message it could not render is `sent` in pgcast though nobody got it. Through the real
webhook with real signed SNS messages (tests.snsmessages)."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from tests import support
from tests.integration import test_api_helpers as h
from tests.integration.test_reconcile import Hook, audit, hook, row, ses_event

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT
__all__ = ["hook"]  # the fixture, used by name


def all_sent(conn: Conn, n: int = 3) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    """A finished broadcast whose rows were all sent, each with its own message id."""
    support.seed_contacts(conn, n, account=A)
    bid = support.new_broadcast(conn, account=A)
    conn.execute("UPDATE broadcast_recipients SET status = 'sent', worker = 'w', attempts = 1, "
                 "handed_at = now(), sent_at = now(), provider_message_id = 'ses-' || contact_id"
                 " WHERE broadcast_id = %s", (bid,))
    conn.execute("UPDATE broadcasts SET sent = total, status = 'sent', finished_at = now() "
                 "WHERE id = %s", (bid,))
    rows = conn.execute("SELECT contact_id, email, provider_message_id FROM broadcast_recipients"
                        " WHERE broadcast_id = %s ORDER BY contact_id", (bid,)).fetchall()
    return bid, [dict(r) for r in rows]


def rendering_failure(r: dict[str, Any], bid: uuid.UUID, message_id: str) -> dict[str, Any]:
    body = ses_event("Rendering Failure", r, bid)
    body["mail"]["messageId"] = message_id
    return body


def test_a_rendering_failure_fails_the_sent_row_of_its_message_once(hook: Hook,
                                                                   conn: Conn) -> None:
    bid, rows = all_sent(conn)
    r0 = rows[0]
    answer = hook.event(rendering_failure(r0, bid, r0["provider_message_id"]))
    assert answer["reconciled"] == "failed", answer
    got = row(conn, bid, r0["contact_id"])
    assert (got["status"], got["sent_at"], got["provider_message_id"]) == (
        "failed", None, r0["provider_message_id"])
    assert got["last_error"].startswith("SES renderingfailure: Attribute 'name'")
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["failed"]) == (2, 1)
    [entry] = audit(conn, bid, "rendering_failure")
    assert (entry["contact"], entry["message_id"]) == (r0["contact_id"],
                                                       r0["provider_message_id"])
    # SNS delivering another copy of the event (a new SNS message id) changes nothing more
    again = hook.event(rendering_failure(r0, bid, r0["provider_message_id"]))
    assert "reconciled" not in again
    assert support.assert_counters_true(conn, bid)["failed"] == 1


def test_a_rendering_failure_of_another_message_or_a_delivery_changes_nothing(
        hook: Hook, conn: Conn) -> None:
    bid, rows = all_sent(conn)
    assert "reconciled" not in hook.event(rendering_failure(rows[0], bid, "someone-else"))
    delivery = ses_event("Delivery", rows[1], bid)
    delivery["mail"]["messageId"] = rows[1]["provider_message_id"]
    assert "reconciled" not in hook.event(delivery)
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["failed"]) == (3, 0)
    assert audit(conn, bid, "rendering_failure") == []
