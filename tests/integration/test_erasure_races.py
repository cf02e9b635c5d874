"""Issue 24: an erasure holds whatever runs at the same time, forced with real sessions.

Each test drives real connections into the order that let an erased address survive (or an
import deadlock) on 0011's functions, then asserts on the rows. A session that must wait is
observed waiting in pg_stat_activity, never guessed with a sleep.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import psycopg
import pytest

from pgcast.sql import contacts, retention
from pgcast.sql.queries import QUERIES
from tests import support
from tests.integration import test_dispatch as d
from tests.integration.test_fences import backend_pid, connect, waiting_or_done
from tests.integration.test_retention import sent_broadcast

Conn = psycopg.Connection[dict[str, Any]]
GONE = "user0@example.com"


def erase(conn: Conn, email: str = GONE) -> dict[str, Any]:
    row = conn.execute(QUERIES["contact_erase"], {"account": "default", "email": email,
                                                  "source": "sql", "actor": "{}"}).fetchone()
    assert row is not None
    return row


def traces(conn: Conn, email: str = GONE) -> dict[str, int]:
    """Where the address is still held in clear: live, archived, contacts, errors."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM contacts WHERE lower(email) = %(e)s) AS contacts,"
        " (SELECT count(*) FROM broadcast_recipients_all WHERE lower(email) = %(e)s) AS rows,"
        " (SELECT count(*) FROM broadcast_recipients_all WHERE last_error ILIKE '%%' || %(e)s"
        "  || '%%') AS errors", {"e": email}).fetchone()
    assert row is not None
    return dict(row)


def in_thread_waiting(conn: Conn, session: Conn, fn: Any) -> tuple[Any, dict[str, Any]]:
    """Run fn on `session` in a thread; return once it waits for a lock (or has finished)."""
    pid = backend_pid(session)
    t, out = d.in_thread(fn)
    support.wait_for(waiting_or_done(conn, pid, out))
    return t, out


# -- 1. an erased person comes back -----------------------------------------------------------

def test_an_import_waiting_on_an_erase_does_not_bring_the_person_back(
        db_url: str, conn: Conn) -> None:
    """0011: the upsert checked contact_erasures in its snapshot, then its ON CONFLICT waited
    on the row the erase was deleting; once the erase committed, the insert found no conflict
    and the address came back as a new, subscribed contact."""
    support.seed_contacts(conn, 2)
    with connect(db_url) as eraser, connect(db_url) as importer:
        assert erase(eraser)["contact_id"] is not None  # uncommitted: holds the contact row
        t, out = in_thread_waiting(conn, importer, lambda: contacts.upsert(
            importer, "default", [{"email": GONE, "name": "Back again"}]))
        assert "at" not in out, "the import must wait for the erase"
        eraser.commit()
        t.join(30)
        importer.commit()
    assert "error" not in out, out
    assert out["result"].inserted == 0 and [r["email"] for r in out["result"].erased] == [GONE]
    assert traces(conn) == {"contacts": 0, "rows": 0, "errors": 0}


def test_an_erase_waits_for_an_import_in_flight_and_erases_what_it_wrote(
        db_url: str, conn: Conn) -> None:
    """0011: an erase that ran while an import of the address was uncommitted found no
    contact, returned, and the import then committed the address."""
    support.seed_contacts(conn, 1)
    new = "new@example.com"
    with connect(db_url) as importer, connect(db_url) as eraser:
        importer.execute(QUERIES["contacts_upsert"], {
            "account": "default", "rows": json.dumps([{"email": new}]), "replace": False})
        t, out = in_thread_waiting(conn, eraser, lambda: (erase(eraser, new), eraser.commit())[0])
        importer.commit()
        t.join(30)
    assert "error" not in out, out
    assert out["result"]["contact_id"] is not None, "the erase must see the imported contact"
    assert traces(conn, new) == {"contacts": 0, "rows": 0, "errors": 0}


def test_post_contacts_of_an_erased_address_is_refused(conn: Conn) -> None:
    """The same check through the API's statement: an erased address is never written."""
    support.seed_contacts(conn, 1)
    erase(conn)
    written = contacts.upsert(conn, "default", [{"email": GONE.upper()}])
    assert written.inserted == 0 and len(written.erased) == 1
    assert traces(conn) == {"contacts": 0, "rows": 0, "errors": 0}


# -- 2. an erase during a send's snapshot ------------------------------------------------------

def test_an_erase_during_a_send_snapshot_reaches_the_new_partition(
        db_url: str, conn: Conn) -> None:
    """0011: the erase found no recipient row (the snapshot was not committed), the send then
    committed the address into its partition, and the contact was gone for later erases."""
    support.seed_contacts(conn, 3)
    bid = support.new_broadcast(conn, send=False)
    with connect(db_url) as sender, connect(db_url) as eraser:
        row = sender.execute(QUERIES["broadcast_send"], {
            "account": "default", "id": bid, "allow_empty": False, "details": "{}"}).fetchone()
        assert row is not None and row["ok"] and row["queued"] == 3  # uncommitted
        t, out = in_thread_waiting(conn, eraser, lambda: (erase(eraser), eraser.commit())[0])
        sender.commit()
        t.join(30)
    assert "error" not in out, out
    assert traces(conn) == {"contacts": 0, "rows": 0, "errors": 0}
    assert support.assert_counters_true(conn, bid)["total"] == 3


# -- 3. an erase between retention's detach and its archive -----------------------------------

def detach(conn: Conn, bid: uuid.UUID) -> None:
    """Retention's first step alone: the partition detached CONCURRENTLY, not yet archived."""
    part = conn.execute(QUERIES["retention_partition"], {"id": bid}).fetchone()
    assert part is not None and part["attached"]
    conn.execute(psycopg.sql.SQL(QUERIES["retention_detach"]).format(
        partition=psycopg.sql.Identifier(part["schema"], part["name"])))


def test_an_erase_between_detach_and_archive_leaves_nothing_in_the_archive(conn: Conn) -> None:
    """0011: the detached partition was in neither the live table nor the archive, so the
    erase touched neither; the archive then kept the address and `lookup` returned it."""
    support.seed_contacts(conn, 4)
    bid = sent_broadcast(conn, 4, failed=1)
    detach(conn, bid)
    assert erase(conn)["contact_id"] is not None
    assert retention.archive_one(conn, bid) == 4
    assert traces(conn) == {"contacts": 0, "rows": 0, "errors": 0}
    assert retention.lookup(conn, bid, GONE) == []
    assert len(retention.lookup(conn, bid, "user1@example.com")) == 1


def test_an_erase_during_an_archive_waits_and_erases_the_archived_rows(
        db_url: str, conn: Conn) -> None:
    """The archive copies the detached rows in a transaction the erase cannot see: the erase
    waits for it, then scrubs what it archived."""
    support.seed_contacts(conn, 3)
    bid = sent_broadcast(conn, 3, failed=0)
    detach(conn, bid)
    with connect(db_url) as archiver, connect(db_url) as eraser:
        got = archiver.execute(QUERIES["retention_archive"], {"id": bid}).fetchone()
        assert got == {"archived": 3}  # uncommitted
        t, out = in_thread_waiting(conn, eraser, lambda: (erase(eraser), eraser.commit())[0])
        archiver.commit()
        t.join(30)
    assert "error" not in out, out
    assert traces(conn) == {"contacts": 0, "rows": 0, "errors": 0}
    assert retention.lookup(conn, bid, GONE) == []


# -- 5. an import takes contact rows before any fence -----------------------------------------

@pytest.mark.parametrize("chunk", [contacts.CHUNK, 1])
def test_an_import_and_a_one_click_unsubscribe_do_not_deadlock(
        db_url: str, conn: Conn, chunk: int) -> None:
    """0011: the import's fence trigger fired for row N (an unsubscribe it adds), then its
    ON CONFLICT waited for row N+1, held by a one-click unsubscribe waiting for the fence."""
    support.seed_contacts(conn, 2)
    ids = [r["id"] for r in conn.execute("SELECT id FROM contacts ORDER BY id")]
    when = dt.datetime.now(dt.UTC).isoformat()
    rows = [{"email": "user0@example.com", "unsubscribed_at": when},
            {"email": "user1@example.com", "name": "Renamed"}]
    with connect(db_url) as handoff, connect(db_url) as importer, connect(db_url) as unsub:
        # a handoff in progress holds the contacts fence shared: both writers queue on it
        handoff.execute("SELECT pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), "
                        "hashtext('default'))")
        t_imp, out_imp = in_thread_waiting(conn, importer, lambda: (
            contacts.upsert(importer, "default", rows, chunk_size=chunk), importer.commit())[0])
        t_un, out_un = in_thread_waiting(conn, unsub, lambda: (unsub.execute(
            QUERIES["one_click_unsubscribe"], {"contact_id": ids[1], "account_prefix": None,
                                               "broadcast_id": None}).fetchone(),
            unsub.commit())[0])
        handoff.commit()
        t_imp.join(60)
        t_un.join(60)
    errors = [o["error"] for o in (out_imp, out_un) if "error" in o]
    assert not errors, errors
    states = {r["email"]: r for r in conn.execute(
        "SELECT email, name, unsubscribed_at IS NOT NULL AS unsubscribed FROM contacts")}
    assert states["user0@example.com"]["unsubscribed"]
    assert states["user1@example.com"]["unsubscribed"]
    assert states["user1@example.com"]["name"] == "Renamed"


# -- 7. a record after an erase -----------------------------------------------------------------

def test_a_record_after_an_erase_does_not_write_the_address_back(
        db_url: str, conn: Conn) -> None:
    """0011: the provider's error text (SES quotes the address) went into last_error of the
    erased recipient row."""
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn)
    token, rows = d.claim(conn, bid, 2)
    ids = [r["contact_id"] for r in rows]
    assert len(d.handoff(conn, bid, rows[0]["epoch"], token, ids)) == 2
    errors = [f"MessageRejected: Address blacklisted: <{GONE}>",
              "MessageRejected: Address blacklisted: <user1@example.com>"]
    with connect(db_url) as eraser, connect(db_url) as recorder:
        assert erase(eraser)["recipients"] == 1  # uncommitted: holds the recipient row
        t, out = in_thread_waiting(conn, recorder, lambda: (recorder.execute(QUERIES["record"], {
            "id": bid, "token": token, "ids": ids, "outcomes": ["failed", "failed"],
            "message_ids": [None, None], "errors": errors, "retry_in": [0.0, 0.0],
            "breaker": 0}).fetchone(), recorder.commit())[0])
        eraser.commit()
        t.join(30)
    assert "error" not in out, out
    assert out["result"]["recorded"] == 2
    assert traces(conn) == {"contacts": 0, "rows": 0, "errors": 0}
    kept = {r["email"]: r["last_error"] for r in conn.execute(
        "SELECT email, last_error FROM broadcast_recipients WHERE broadcast_id = %s", (bid,))}
    assert kept["user1@example.com"] == errors[1]  # another contact's error is kept as given
    assert support.assert_counters_true(conn, bid)["failed"] == 2


def test_a_record_that_commits_after_an_erase_is_scrubbed_too(conn: Conn) -> None:
    """The same record, arriving after the erase committed (the worker was slow to answer)."""
    support.seed_contacts(conn, 1)
    bid = support.new_broadcast(conn)
    token, rows = d.claim(conn, bid, 1)
    d.handoff(conn, bid, rows[0]["epoch"], token, [rows[0]["contact_id"]])
    erase(conn)
    conn.execute(QUERIES["record"], {
        "id": bid, "token": token, "ids": [rows[0]["contact_id"]], "outcomes": ["retry"],
        "message_ids": [None], "errors": [f"Throttling: <{GONE}>"], "retry_in": [1.0],
        "breaker": 0})
    assert traces(conn) == {"contacts": 0, "rows": 0, "errors": 0}


# -- what else an erase leaves ------------------------------------------------------------------

def test_an_erase_scrubs_event_details_and_test_sends(conn: Conn) -> None:
    """SES diagnostics in contact_events, test sends to the address and their audit entries
    keep no copy of it."""
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn, send=False)
    cid = conn.execute("SELECT id FROM contacts WHERE email = %s", (GONE,)).fetchone()
    assert cid is not None
    conn.execute("INSERT INTO contact_events (account, contact_id, action, source, details) "
                 "VALUES ('default', %s, 'suppress', 'ses', %s)",
                 (cid["id"], json.dumps({"event": "bounce", "detail": f"550 <{GONE}> unknown",
                                         "reason": "bounce"})))
    conn.execute("INSERT INTO test_sends (account, broadcast_id, to_address, contact_email, "
                 "error) VALUES ('default', %s, %s, NULL, NULL), ('default', %s, "
                 "'me@example.com', %s, %s)", (bid, GONE.upper(), bid, GONE, f"<{GONE}>"))
    queued = conn.execute(QUERIES["test_send_queue"], {
        "account": "default", "id": bid, "to": ["Me@example.com", GONE.upper()],
        "contact": GONE, "cap": 10}).fetchone()
    assert queued is not None and queued["ok"]
    other = support.new_broadcast(conn, send=False)  # its audit log names nobody: untouched
    untouched = conn.execute("SELECT audit_log FROM broadcasts WHERE id = %s",
                             (other,)).fetchone()
    erase(conn)
    audit = conn.execute("SELECT audit_log FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert audit is not None and GONE not in json.dumps(audit).lower()
    test = [e for e in audit["audit_log"] if e["action"] == "test"]
    assert [e["details"]["to"] for e in test] == [["Me@example.com", "erased@erased.invalid"]]
    assert conn.execute("SELECT audit_log FROM broadcasts WHERE id = %s",
                        (other,)).fetchone() == untouched
    events = conn.execute("SELECT details FROM contact_events WHERE contact_id = %s "
                          "AND action = 'suppress'", (cid["id"],)).fetchone()
    assert events == {"details": {"event": "bounce", "reason": "bounce"}}
    sends = conn.execute("SELECT to_address, contact_email, error FROM test_sends "
                         "ORDER BY id").fetchall()
    assert len(sends) == 4 and all(GONE not in json.dumps(s).lower() for s in sends), sends
    assert sends[1]["to_address"] == "me@example.com"
    assert sends[2]["to_address"] == "Me@example.com"


# -- the erasure lock comes before a scheduled broadcast's row ---------------------------------

def test_an_erase_and_a_scheduled_start_do_not_deadlock(db_url: str, conn: Conn) -> None:
    """The erase rewrites the audit log of a broadcast whose test entry names the address;
    the sweeper's start locked that scheduled broadcast first, then waited in send_v5 for the
    erasure lock the erase held: a deadlock. The start now takes the lock first, and leaves a
    broadcast of an account an erase holds to the next sweep."""
    support.seed_contacts(conn, 3)
    bid = support.new_broadcast(conn, send=False)
    queued = conn.execute(QUERIES["test_send_queue"], {
        "account": "default", "id": bid, "to": [GONE], "contact": None, "cap": 50}).fetchone()
    assert queued is not None and queued["ok"]
    conn.execute("UPDATE broadcasts SET status = 'scheduled', scheduled_at = now() "
                 "WHERE id = %s", (bid,))
    with connect(db_url) as holder, connect(db_url) as eraser, connect(db_url) as sweeper:
        # the erase takes the erasure lock, then waits for the contact row held here
        holder.execute("SELECT id FROM contacts WHERE email = %s FOR UPDATE", (GONE,))
        t_erase, out_erase = in_thread_waiting(
            conn, eraser, lambda: (erase(eraser), eraser.commit())[0])
        t_start, out_start = in_thread_waiting(conn, sweeper, lambda: (
            sweeper.execute(QUERIES["start_due"]).fetchall(), sweeper.commit())[0])
        holder.commit()  # the erase goes on to the broadcast's audit log
        t_erase.join(30)
        t_start.join(30)
    errors = [o["error"] for o in (out_erase, out_start) if "error" in o]
    assert not errors, errors
    assert out_start["result"] == []  # the account was being erased: left to the next sweep
    started = conn.execute(QUERIES["start_due"]).fetchall()
    assert [(r["broadcast_id"], r["status"]) for r in started] == [(bid, "sending")]
    assert support.progress(conn, bid)["total"] == 2  # the erased person is not a recipient
    log = conn.execute("SELECT audit_log::text AS t FROM broadcasts WHERE id = %s",
                       (bid,)).fetchone()
    assert log is not None and GONE not in log["t"]


# -- test sends: decided under the erasure lock ------------------------------------------------

def queue_test(session: Conn, bid: uuid.UUID, to: list[str],
               contact: str | None = None) -> dict[str, Any]:
    row = session.execute(QUERIES["test_send_queue"], {
        "account": "default", "id": bid, "to": to, "contact": contact, "cap": 50}).fetchone()
    assert row is not None
    return row


def test_a_test_send_waits_for_an_erase_and_is_refused_after_it(
        db_url: str, conn: Conn) -> None:
    """The refusal was read before the queue, in other statements and without the erasure
    lock: a test send racing an erase queued the address (mailed, and written back into
    test_sends and the audit log after the erase)."""
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn, send=False)
    with connect(db_url) as eraser, connect(db_url) as tester:
        erase(eraser)  # uncommitted: holds the erasure lock
        t, out = in_thread_waiting(conn, tester, lambda: (
            queue_test(tester, bid, [GONE, "me@example.com"]), tester.commit())[0])
        eraser.commit()
        t.join(30)
    assert "error" not in out, out
    assert out["result"]["ok"] is False
    assert out["result"]["refused"] == [{"field": "to", "address": GONE, "reason": "erased"}]
    leaks = conn.execute("SELECT (SELECT count(*) FROM test_sends) AS sends, (SELECT count(*) "
                         "FROM broadcasts WHERE audit_log::text ILIKE '%%' || %s || '%%') AS logs",
                         (GONE,)).fetchone()
    assert leaks == {"sends": 0, "logs": 0}


def test_an_erased_contact_is_refused_as_a_test_sends_contact(conn: Conn) -> None:
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn, send=False)
    erase(conn)
    got = queue_test(conn, bid, ["me@example.com"], contact=GONE)
    assert (got["ok"], got["refused"]) == (
        False, [{"field": "contact", "address": GONE, "reason": "erased"}])
    assert conn.execute("SELECT count(*) AS n FROM test_sends").fetchone() == {"n": 0}


def test_an_erase_withdraws_a_queued_test_send_to_the_address(conn: Conn) -> None:
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn, send=False)
    assert queue_test(conn, bid, [GONE, "me@example.com"])["ok"]
    erase(conn)
    rows = conn.execute("SELECT to_address, status, error FROM test_sends ORDER BY id").fetchall()
    assert rows == [
        {"to_address": "erased@erased.invalid", "status": "failed",
         "error": "withdrawn: an address was erased"},
        {"to_address": "me@example.com", "status": "queued", "error": None}]
