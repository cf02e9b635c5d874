"""Real `pgcast worker` processes send broadcasts by SendBulkEmail (issue 32) through real boto3
to moto with SendBulkEmail (tests.motobulk), the fault proxy in between where a test needs a
call-wide fault: each entry's outcome becomes its row's, a whole call's throttle and lost
answer become every entry's, and a server without the operation is sent to by SendEmail."""

from __future__ import annotations

import collections
import email.utils
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests import faultproxy, support

pytestmark = pytest.mark.acceptance

Conn = psycopg.Connection[dict[str, Any]]
SENDER = "news@example.com"
WAIT = 120.0  # seconds


def worker_env(ses: support.MotoServer, **extra: str) -> dict[str, str]:
    return {**ses.env(), "PGCAST_PROVIDER": "ses", "PGCAST_RATE": "0", **extra}


def start(procs: support.Processes, db_url: str, env: dict[str, str], *flags: str) -> Any:
    return procs.start(db_url, "worker", "--retry-base", "0.05", *flags, **env)


def finished(conn: Conn, bid: uuid.UUID) -> dict[str, Any]:
    return support.wait_for(
        lambda: (p := support.progress(conn, bid))["status"] in ("sent", "failed", "paused")
        and p, timeout=WAIT, every=0.2, what="the broadcast to finish")


def rows(conn: Conn, bid: uuid.UUID) -> dict[str, dict[str, Any]]:
    return {r["email"]: dict(r) for r in conn.execute(
        "SELECT contact_id, email, status, attempts, last_error, provider_message_id "
        "FROM broadcast_recipients WHERE broadcast_id = %s", (bid,)).fetchall()}


def delivered(ses: support.MotoServer) -> collections.Counter[str]:
    return collections.Counter(email.utils.parseaddr(to)[1] for m in ses.messages()
                               for to in m["destinations"]["ToAddresses"])


def address(entry: dict[str, Any]) -> str:
    return email.utils.parseaddr(entry["to"])[1]


@pytest.fixture
def proxy(ses: support.MotoServer) -> Iterator[faultproxy.FaultProxy]:
    ses.verify(SENDER)
    with faultproxy.running(ses.url) as p:
        yield p


def test_each_entrys_outcome_becomes_its_rows(conn: Conn, db_url: str,
                                              ses: support.MotoServer,
                                              procs: support.Processes) -> None:
    ses.verify(SENDER)
    ses.bulk_faults({"^user3@": "MESSAGE_REJECTED", "^user5@": "INVALID_PARAMETER",
                     "^user7@": "TRANSIENT_FAILURE", "^user9@": "FAILED",
                     "^user11@": "ACCOUNT_THROTTLED:1"})
    support.seed_contacts(conn, 30)
    bid = support.new_broadcast(conn, from_address=SENDER)
    start(procs, db_url, worker_env(ses), "--group-size", "10", "--max-retries", "1")
    p = finished(conn, bid)
    assert (p["status"], p["sent"], p["failed"], p["unknown"]) == ("sent", 26, 4, 0), p
    support.assert_counters_true(conn, bid)
    got = rows(conn, bid)
    assert got["user3@example.com"]["last_error"].startswith("MessageRejected: ")
    assert got["user5@example.com"]["last_error"].startswith("InvalidParameterValue: ")
    for a in ("user3@example.com", "user5@example.com"):
        assert (got[a]["status"], got[a]["attempts"]) == ("failed", 1)  # never retried
    for a in ("user7@example.com", "user9@example.com"):  # retried, then given up
        assert (got[a]["status"], got[a]["attempts"]) == ("failed", 2)
        assert got[a]["last_error"].startswith("gave up after 2 attempts")
    # a throttled entry is retried, and the throttle was no attempt
    assert (got["user11@example.com"]["status"], got["user11@example.com"]["attempts"]) == (
        "sent", 1)
    entries = ses.bulk_entries()
    success = {address(e): e["message_id"] for e in entries if e["status"] == "SUCCESS"}
    assert len(success) == sum(1 for e in entries if e["status"] == "SUCCESS")  # once each
    sent = {a: r["provider_message_id"] for a, r in got.items() if r["status"] == "sent"}
    # each sent row holds the id of the one message the server accepted for it: a bulk
    # entry's, or SendEmail's when its retry went alone (a group's only fitting message
    # goes by SendEmail), so the bulk entries' are among them
    accepted = {email.utils.parseaddr(to)[1]: m["id"] for m in ses.messages()
                for to in m["destinations"]["ToAddresses"]}
    assert sent == accepted
    assert success.items() <= sent.items()
    counts = delivered(ses)
    assert sorted(counts) == sorted(sent) and set(counts.values()) == {1}
    # by SendBulkEmail, several entries a call
    assert max(collections.Counter(e["call"] for e in entries).values()) > 1


def test_entries_carry_each_recipients_unsubscribe_link_and_tags(
        conn: Conn, db_url: str, ses: support.MotoServer, procs: support.Processes) -> None:
    ses.verify(SENDER)
    support.seed_contacts(conn, 12)
    bid = support.new_broadcast(conn, from_address=SENDER)
    start(procs, db_url, worker_env(ses), "--group-size", "6")
    assert finished(conn, bid)["sent"] == 12
    got = rows(conn, bid)
    entries = ses.bulk_entries()
    assert sorted(address(e) for e in entries) == sorted(got)
    assert len({e["headers"]["List-Unsubscribe"] for e in entries}) == 12
    for e in entries:
        assert e["headers"]["List-Unsubscribe"].startswith("<https://pgcast.example/")
        assert e["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert e["headers"]["X-Pgcast-Broadcast"] == str(bid)
        assert e["tags"] == {"pgcast_broadcast": str(bid),
                             "pgcast_contact": str(got[address(e)]["contact_id"])}
        assert (e["subject"], e["text"], e["missing"]) == ("Hello", "Hello there", [])


def test_a_throttled_call_is_retried_whole_and_each_recipient_gets_one(
        conn: Conn, db_url: str, ses: support.MotoServer, procs: support.Processes,
        proxy: faultproxy.FaultProxy) -> None:
    proxy.set_rules(faultproxy.bulk_throttled(limit=1))
    support.seed_contacts(conn, 20)
    bid = support.new_broadcast(conn, from_address=SENDER)
    start(procs, db_url, worker_env(ses, **proxy.env(), PGCAST_RATE="200",
                                    PGCAST_BURST="10"), "--group-size", "10")
    p = finished(conn, bid)
    assert (p["status"], p["sent"], p["failed"], p["unknown"]) == ("sent", 20, 0, 0), p
    assert proxy.injected == 1
    assert {r["attempts"] for r in rows(conn, bid).values()} == {1}  # a throttle: no attempt
    counts = delivered(ses)
    assert len(counts) == 20 and set(counts.values()) == {1}


def test_a_lost_answer_leaves_its_chunk_unknown_and_nobody_is_mailed_twice(
        conn: Conn, db_url: str, ses: support.MotoServer, procs: support.Processes,
        proxy: faultproxy.FaultProxy) -> None:
    proxy.set_rules(faultproxy.bulk_answer_lost(limit=1, skip=1))  # the second call's
    support.seed_contacts(conn, 20)
    bid = support.new_broadcast(conn, from_address=SENDER)
    start(procs, db_url, worker_env(ses, **proxy.env()), "--group-size", "5")
    support.wait_for(lambda: (c := support.status_counts(conn, bid)).get("sent", 0)
                     + c.get("unknown", 0) == 20, timeout=WAIT, what="every row answered")
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["unknown"]) == (15, 5), p
    unknown = sorted(a for a, r in rows(conn, bid).items() if r["status"] == "unknown")
    lost_call = collections.defaultdict(list)
    for e in ses.bulk_entries():
        lost_call[e["call"]].append(address(e))
    assert unknown in [sorted(v) for v in lost_call.values()]  # one call's entries, all
    counts = delivered(ses)
    assert len(counts) == 20 and set(counts.values()) == {1}  # SES took them, once


def test_a_server_without_send_bulk_email_is_sent_to_by_send_email(
        conn: Conn, db_url: str, procs: support.Processes) -> None:
    plain = support.MotoServer(plain=True)
    try:
        plain.verify(SENDER)
        support.seed_contacts(conn, 30)
        bid = support.new_broadcast(conn, from_address=SENDER)
        worker = start(procs, db_url, worker_env(plain), "--group-size", "10")
        p = finished(conn, bid)
        assert (p["status"], p["sent"], p["failed"], p["unknown"]) == ("sent", 30, 0, 0), p
        assert {r["attempts"] for r in rows(conn, bid).values()} == {1}
        counts = delivered(plain)
        assert len(counts) == 30 and set(counts.values()) == {1}
        assert procs.stop(worker) == 0
        assert procs.log(worker).count("does not serve SendBulkEmail") == 1
    finally:
        plain.close()
