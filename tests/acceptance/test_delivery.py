"""Real `pgcast worker` processes deliver through real boto3 to moto's SES server."""

from __future__ import annotations

import collections
import uuid
from typing import Any

import psycopg

from pgcast.sql import contacts
from tests import support

Conn = psycopg.Connection[dict[str, Any]]


def ses_env(ses: support.MotoServer, **extra: str) -> dict[str, str]:
    return {**ses.env(), "PGCAST_PROVIDER": "ses", "PGCAST_RATE": "0", **extra}


def wait_terminal(conn: Conn, bid: uuid.UUID, timeout: float = 240) -> dict[str, Any]:
    return support.wait_for(
        lambda: (p := support.progress(conn, bid))["status"] in ("sent", "failed", "cancelled")
        and p, timeout=timeout, every=0.2, what=f"broadcast {bid} to finish")


def test_three_workers_deliver_5000_recipients_exactly_once(
        conn: Conn, db_url: str, ses: support.MotoServer, procs: support.Processes) -> None:
    ses.verify("news@example.com")
    support.seed_contacts(conn, 5000)
    bid = support.new_broadcast(conn)
    workers = [procs.start(db_url, "worker", "--concurrency", "3", "--batch-size", "200",
                           "--group-size", "25", **ses_env(ses)) for _ in range(3)]
    p = wait_terminal(conn, bid)
    assert p["status"] == "sent" and p["sent"] == 5000, p
    support.assert_counters_true(conn, bid)
    delivered = collections.Counter(
        to for m in ses.messages() for to in m["destinations"]["ToAddresses"])
    rows = conn.execute("SELECT email, provider_message_id FROM broadcast_recipients "
                        "WHERE broadcast_id = %s", (bid,)).fetchall()
    assert len(delivered) == 5000
    assert max(delivered.values()) == 1  # nobody mailed twice
    assert {to.split("<")[-1].rstrip(">") for to in delivered} == {r["email"] for r in rows}
    assert {m["id"] for m in ses.messages()} == {r["provider_message_id"] for r in rows}
    # more than one worker took part: the claims were shared
    workers_seen = conn.execute("SELECT count(DISTINCT worker) AS n FROM broadcast_recipients "
                                "WHERE broadcast_id = %s", (bid,)).fetchone()
    assert workers_seen is not None and workers_seen["n"] >= 2
    for w in workers:
        assert procs.stop(w) == 0  # SIGTERM: clean exit


def test_unsubscribed_after_send_is_skipped_and_never_mailed(
        conn: Conn, db_url: str, ses: support.MotoServer, procs: support.Processes) -> None:
    ses.verify("news@example.com")
    support.seed_contacts(conn, 300)
    bid = support.new_broadcast(conn)
    gone = [f"user{i}@example.com" for i in range(0, 300, 7)]
    for address in gone:  # after the snapshot, before any handoff
        contacts.unsubscribe(conn, "default", address)
    procs.start(db_url, "worker", **ses_env(ses))
    p = wait_terminal(conn, bid)
    assert (p["status"], p["skipped"], p["sent"]) == ("sent", len(gone), 300 - len(gone))
    support.assert_counters_true(conn, bid)
    mailed = {to for m in ses.messages() for to in m["destinations"]["ToAddresses"]}
    assert not {a for a in mailed if a.split("<")[-1].rstrip(">") in gone}


def test_message_rejected_fails_the_recipient_with_the_reason(
        conn: Conn, db_url: str, ses: support.MotoServer, procs: support.Processes) -> None:
    # moto rejects mail from an unverified sender with MessageRejected
    support.seed_contacts(conn, 40)
    bid = support.new_broadcast(conn, from_address="unverified@example.com")
    procs.start(db_url, "worker", **ses_env(ses, PGCAST_BREAKER="0"))
    p = wait_terminal(conn, bid)
    # the last recipient failed too: the broadcast is finished, not stuck in sending
    assert (p["status"], p["failed"], p["sent"]) == ("failed", 40, 0)
    support.assert_counters_true(conn, bid)
    reasons = conn.execute("SELECT DISTINCT last_error, attempts FROM broadcast_recipients "
                           "WHERE broadcast_id = %s", (bid,)).fetchall()
    assert len(reasons) == 1
    assert reasons[0]["last_error"].startswith("MessageRejected")
    assert reasons[0]["attempts"] == 1  # permanent: not retried
    assert ses.messages() == []


def test_once_mode_drains_and_exits(conn: Conn, db_url: str, tmp_path: Any) -> None:
    support.seed_contacts(conn, 120)
    bid = support.new_broadcast(conn)
    outbox = tmp_path / "outbox"
    done = support.pgcast(db_url, "worker", "--once", env=support.pgcast_env(
        db_url, PGCAST_PROVIDER="file", PGCAST_OUTBOX_DIR=str(outbox)))
    assert done.returncode == 0
    p = support.progress(conn, bid)
    assert (p["status"], p["sent"]) == ("sent", 120)
    files = list((outbox / str(bid)).glob("*.eml"))
    assert len(files) == 120
    text = files[0].read_text()
    assert "Subject: Hello" in text and "From: news@example.com" in text
    assert "Message-ID: <" in text
