"""Rows nobody should have stored (direct SQL, older versions) and errors nobody expects: a
worker process outlives them all, each bad recipient gets its own outcome, and the other
broadcasts keep sending (issue 11 §1)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench import sesd
from tests import support

Conn = psycopg.Connection[dict[str, Any]]
TERMINAL = ("sent", "failed", "cancelled")
# a name that would become header syntax, and a local part SES cannot send (with a name,
# email.utils.formataddr raises UnicodeEncodeError on it)
BAD = [("bob@example.com", "Bob\r\nBcc: x@y"), ("üser@example.com", "Jürgen")]


@pytest.fixture
def endpoint() -> Iterator[sesd.Endpoint]:
    with sesd.running(0.01) as ep:
        yield ep


def insert_raw(conn: Conn, account: str, rows: list[tuple[str, str]]) -> None:
    """Contacts written by direct SQL: no validation at all."""
    for address, name in rows:
        conn.execute("INSERT INTO contacts (account, email, name) VALUES (%s, %s, %s)",
                     (account, address, name))


def wait_done(conn: Conn, proc: subprocess.Popen[str], *bids: uuid.UUID,
              timeout: float = 90) -> None:
    """Every broadcast finished, or the worker died (the assertions then say so)."""
    support.wait_for(lambda: proc.poll() is not None or all(
        support.progress(conn, b)["status"] in TERMINAL for b in bids),
        timeout=timeout, what="broadcasts to finish")


def rows_of(conn: Conn, bid: uuid.UUID) -> dict[str, dict[str, Any]]:
    return {r["email"]: r for r in conn.execute(
        "SELECT * FROM broadcast_recipients WHERE broadcast_id = %s", (bid,)).fetchall()}


def test_contacts_whose_message_cannot_be_built_do_not_stop_the_worker(
        conn: Conn, db_url: str, procs: support.Processes, tmp_path: Path) -> None:
    support.seed_contacts(conn, 30, account="a")
    insert_raw(conn, "a", BAD)
    support.seed_contacts(conn, 30, account="b", domain="b.example.com")
    bad = support.new_broadcast(conn, account="a")
    other = support.new_broadcast(conn, account="b")
    proc = procs.start(db_url, "worker", "--concurrency", "2", PGCAST_PROVIDER="file",
                       PGCAST_OUTBOX_DIR=str(tmp_path / "outbox"), PGCAST_RATE="0")
    wait_done(conn, proc, bad, other)
    assert proc.poll() is None, procs.log(proc)
    assert support.assert_counters_true(conn, other)["sent"] == 30
    p = support.assert_counters_true(conn, bad)
    assert p["unknown"] == 0 and p["pending"] == 0, p
    rows = rows_of(conn, bad)
    for address, _ in BAD:
        row = rows[address]
        # nothing was attempted that could have left: failed, with the reason, or sent safely
        assert row["status"] in ("failed", "sent"), row
        if row["status"] == "failed":
            # render.render refused it, or the file provider could not write it
            assert row["last_error"] and ("cannot build" in row["last_error"]
                                          or "Error: " in row["last_error"]), row
    assert p["sent"] >= 30
    assert procs.stop(proc) == 0


def test_an_unexpected_answer_after_the_request_left_is_unknown_not_fatal(
        conn: Conn, db_url: str, procs: support.Processes, endpoint: sesd.Endpoint) -> None:
    """SES answered, but with nothing pgcast can read: the message may be out, so the row is
    `unknown` (never re-sent); the worker lives on and the rest is sent."""
    endpoint.no_id_for.append("user7@example.com")
    support.seed_contacts(conn, 40)
    bid = support.new_broadcast(conn)
    proc = procs.start(db_url, "worker", "--concurrency", "2",
                       **endpoint.env(), PGCAST_RATE="0")
    wait_done(conn, proc, bid)
    assert proc.poll() is None, procs.log(proc)
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["unknown"]) == (39, 1), p
    row = rows_of(conn, bid)["user7@example.com"]
    assert row["status"] == "unknown" and row["last_error"], row
    got = [r.to for r in endpoint.snapshot()]
    assert len(got) == 40 and len(set(got)) == 40  # nobody twice, user7 included
    assert procs.stop(proc) == 0


def test_a_loop_that_meets_an_unexpected_error_releases_backs_off_and_carries_on(
        conn: Conn, db_url: str, procs: support.Processes, tmp_path: Path) -> None:
    """A statement fails in a way no code path expects (here a trigger a DBA added): the loop
    logs it with the broadcast id, releases what it holds, and the worker keeps sending the
    other broadcast; once the cause is gone, the first one finishes, each recipient once."""
    support.seed_contacts(conn, 30, account="a")
    support.seed_contacts(conn, 30, account="b", domain="b.example.com")
    bad = support.new_broadcast(conn, account="a")
    victim = conn.execute("SELECT min(contact_id) AS c FROM broadcast_recipients "
                          "WHERE broadcast_id = %s", (bad,)).fetchone()
    assert victim is not None
    conn.execute(
        "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'boom for %', NEW.contact_id; END $$")
    conn.execute(
        "CREATE TRIGGER boom BEFORE UPDATE ON broadcast_recipients FOR EACH ROW "
        f"WHEN (NEW.contact_id = {int(victim['c'])} AND NEW.status = 'sending') "
        "EXECUTE FUNCTION boom()")
    proc = procs.start(db_url, "worker", "--concurrency", "1", "--group-size", "5",
                       PGCAST_PROVIDER="file", PGCAST_OUTBOX_DIR=str(tmp_path / "outbox"),
                       PGCAST_RATE="0")
    support.wait_for(lambda: proc.poll() is not None or str(bad) in procs.log(proc),
                     timeout=60, what="the error logged with the broadcast id")
    other = support.new_broadcast(conn, account="b")
    wait_done(conn, proc, other)
    assert proc.poll() is None, procs.log(proc)
    assert support.assert_counters_true(conn, other)["sent"] == 30
    assert support.progress(conn, bad)["status"] == "sending"
    # what the loop held went back: nothing stays claimed or handed off
    support.wait_for(lambda: support.status_counts(conn, bad).keys() <= {"pending", "sent"},
                     timeout=30, what="the failed claim released")
    conn.execute("DROP TRIGGER boom ON broadcast_recipients")
    wait_done(conn, proc, bad)
    p = support.assert_counters_true(conn, bad)
    assert (p["status"], p["sent"], p["unknown"]) == ("sent", 30, 0), p
    outbox = list((tmp_path / "outbox" / str(bad)).glob("*.eml"))
    assert len(outbox) == 30
    assert procs.stop(proc) == 0
