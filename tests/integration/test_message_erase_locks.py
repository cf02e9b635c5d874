"""pgcast_send_message inside the caller's transaction, against a concurrent erase (issue 26):
the deadlock pgcast_erase_v6 had, gone with pgcast_erase_v7. Two real sessions each.

v6 takes the account's erasure lock (exclusive), then the erased contact's row, then the
account's contacts fence, waiting for each while holding the ones before; pgcast_send_message
takes the erasure lock (shared). A transaction that holds the row or the fence when it calls
pgcast_send_message, while a v6 erase of that contact waits for it, closes the circle. v7 (the
erase of the CLI and the API) waits for the row and the fence at most 100 ms while it holds the
erasure lock: then it lets everything go and waits holding nothing.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from pgcast.sql import broadcasts, segments
from pgcast.sql.queries import QUERIES
from tests import support

Conn = psycopg.Connection[dict[str, Any]]
ACCOUNT = "acme"
SEND = ("SELECT pgcast_send_message(%s, %s, 'Welcome', 'Hi', NULL, 'shop@example.com', NULL) "
        "AS id")
ERASE_V6 = "SELECT * FROM pgcast_erase_v6(%(account)s, 'ann@example.com', 'test', '{}')"
# the erase of `pgcast contacts erase` and POST /contacts/erase
ERASE = QUERIES["contact_erase"]
ERASE_PARAMS = {"email": "ann@example.com", "source": "test", "actor": "{}"}
# what the application did first in its transaction
ANN = "(SELECT id FROM contacts WHERE lower(email) = 'ann@example.com')"
FIRST = {
    # a row lock on the contact being erased
    "update": "UPDATE contacts SET name = 'Ann' WHERE lower(email) = 'ann@example.com'",
    "for update": f"SELECT 1 FROM contacts WHERE id = {ANN} FOR UPDATE",
    "for share": f"SELECT 1 FROM contacts WHERE id = {ANN} FOR SHARE",
    "foreign key": f"INSERT INTO app_orders (contact_id) VALUES ({ANN})",  # FOR KEY SHARE
    # any contact of the account unsubscribed, confirmed or deleted: the contacts fence
    "unsubscribe": "UPDATE contacts SET unsubscribed_at = now() "
                   "WHERE lower(email) = 'zed@example.com'",
    "confirm": "UPDATE contacts SET confirmed_at = NULL WHERE lower(email) = 'zed@example.com'",
    "delete": "DELETE FROM contacts WHERE lower(email) = 'zed@example.com'",
}


def blocked(conn: Conn, pid: int) -> bool:
    row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                       (pid,)).fetchone()
    return row is not None and row["wait_event_type"] == "Lock"


def erase_in_thread(db_url: str, outcome: dict[str, Any],
                    statement: str = ERASE) -> tuple[threading.Thread, int]:
    """An erase of ann in a session of its own; its pid."""
    session = support.connect(db_url)

    def run() -> None:
        try:
            session.execute(statement, {"account": ACCOUNT, **ERASE_PARAMS})
            outcome["erase"] = "done"
        except psycopg.errors.DeadlockDetected:
            outcome["erase"] = "deadlock"
        except psycopg.Error as exc:  # reported by the assertions, not lost in the thread
            outcome["erase"] = repr(exc)
        finally:
            session.close()

    t = threading.Thread(target=run)
    t.start()
    return t, session.info.backend_pid


def seed(conn: Conn) -> None:
    # an application table that refers to the contacts (and lets an erase delete one)
    conn.execute("CREATE TABLE app_orders (contact_id bigint REFERENCES contacts (id) "
                 "ON DELETE SET NULL)")
    conn.execute("INSERT INTO contacts (account, email) VALUES (%s, 'ann@example.com'), "
                 "(%s, 'zed@example.com')", (ACCOUNT, ACCOUNT))


@pytest.mark.parametrize("first", sorted(FIRST))
def test_a_contact_lock_taken_before_the_send_deadlocked_with_a_v6_erase(
        conn: Conn, db_url: str, first: str) -> None:
    seed(conn)
    outcome: dict[str, Any] = {}
    with support.connect(db_url) as app:
        app.autocommit = False
        app.execute(FIRST[first])
        eraser, pid = erase_in_thread(db_url, outcome, ERASE_V6)
        support.wait_for(lambda: blocked(conn, pid), timeout=30, what="the erase to wait")
        try:
            app.execute(SEND, (ACCOUNT, "ann@example.com"))
            app.commit()
            outcome["app"] = "done"
        except psycopg.errors.DeadlockDetected:
            app.rollback()
            outcome["app"] = "deadlock"
        eraser.join(timeout=60)
        assert not eraser.is_alive()
    # Postgres breaks the circle: one of the two transactions fails with 40P01
    assert sorted(outcome.values()) == ["deadlock", "done"], outcome


def _lock_then_send_during_an_erase(conn: Conn, db_url: str, first: str) -> None:
    """The application runs `first`, an erase of ann starts and waits, the application sends
    to ann and commits; the erase then runs, after the commit, and erases the message."""
    outcome: dict[str, Any] = {}
    with support.connect(db_url) as app:
        app.autocommit = False
        app.execute(first)  # type: ignore[arg-type]
        eraser, pid = erase_in_thread(db_url, outcome)
        support.wait_for(lambda: blocked(conn, pid), timeout=30, what="the erase to wait")
        # the erase waits for what the application holds, holding nothing it needs: the send
        # goes through, and the erase runs after the commit
        row = app.execute(SEND, (ACCOUNT, "ann@example.com")).fetchone()
        assert row is not None
        assert eraser.is_alive(), outcome  # still waiting for the application's commit
        app.commit()
        eraser.join(timeout=60)
        assert not eraser.is_alive()
    assert outcome == {"erase": "done"}
    message = conn.execute("SELECT status, to_address FROM messages WHERE id = %s",
                           (row["id"],)).fetchone()
    assert message == {"status": "skipped", "to_address": "erased@erased.invalid"}
    assert conn.execute("SELECT count(*) AS n FROM contacts WHERE lower(email) = "
                        "'ann@example.com'").fetchone() == {"n": 0}


@pytest.mark.parametrize("first", sorted(FIRST))
def test_a_contact_lock_taken_before_the_send_never_deadlocks_with_the_erase(
        conn: Conn, db_url: str, first: str) -> None:
    seed(conn)
    _lock_then_send_during_an_erase(conn, db_url, FIRST[first])


# rows the erase rewrites besides the contact's: a broadcast and a saved segment whose filters
# name the address (v7 takes them with the contact row and the fence, under the same budget)
FILTER_ROWS = {
    "broadcast": "UPDATE broadcasts SET subject = 'Changed' WHERE account = 'acme'",
    "segment": "UPDATE segments SET updated_at = now() WHERE account = 'acme'",
}


@pytest.mark.parametrize("first", sorted(FILTER_ROWS))
def test_a_filter_row_locked_before_the_send_never_deadlocks_with_the_erase(
        conn: Conn, db_url: str, first: str) -> None:
    seed(conn)
    segments.save(conn, ACCOUNT, "referred", {"attribute": "referrer", "eq": "ann@example.com"})
    draft = broadcasts.create(conn, ACCOUNT, subject="S", from_address="n@example.com",
                              text="t", filter_value={"tag": "ann@example.com"})
    _lock_then_send_during_an_erase(conn, db_url, FILTER_ROWS[first])
    assert segments.get(conn, ACCOUNT, "referred")["filter"] == {"any": []}
    assert broadcasts.get(conn, ACCOUNT, draft["id"])["segment_filter"] == {"any": []}


def test_the_send_first_then_the_contacts_never_deadlocks(conn: Conn, db_url: str) -> None:
    seed(conn)
    outcome: dict[str, Any] = {}
    with support.connect(db_url) as app:
        app.autocommit = False
        row = app.execute(SEND, (ACCOUNT, "ann@example.com")).fetchone()
        assert row is not None
        eraser, pid = erase_in_thread(db_url, outcome)
        # the erase waits for the send's erasure lock, holding nothing the application needs
        support.wait_for(lambda: blocked(conn, pid), timeout=30, what="the erase to wait")
        for name in ("update", "for update", "unsubscribe"):
            app.execute(FIRST[name])
        app.commit()
        eraser.join(timeout=60)
        assert not eraser.is_alive()
    assert outcome == {"erase": "done"}
    # the erase came after the commit: it found the message and took the address out
    message = conn.execute("SELECT status, to_address FROM messages WHERE id = %s",
                           (row["id"],)).fetchone()
    assert message == {"status": "skipped", "to_address": "erased@erased.invalid"}
    assert conn.execute("SELECT count(*) AS n FROM contacts WHERE lower(email) = "
                        "'ann@example.com'").fetchone() == {"n": 0}


def test_a_foreign_key_without_an_on_delete_action_makes_the_erase_fail_whole(
        conn: Conn, db_url: str) -> None:
    conn.execute("CREATE TABLE app_invoices (contact_id bigint REFERENCES contacts (id))")
    conn.execute("INSERT INTO contacts (account, email) VALUES (%s, 'ann@example.com')",
                 (ACCOUNT,))
    conn.execute(f"INSERT INTO app_invoices (contact_id) VALUES ({ANN})")
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(ERASE, {"account": ACCOUNT, **ERASE_PARAMS})
    # nothing was erased: the contact is there and no hash was kept
    assert conn.execute("SELECT count(*) AS n FROM contacts WHERE lower(email) = "
                        "'ann@example.com'").fetchone() == {"n": 1}
    assert conn.execute("SELECT count(*) AS n FROM contact_erasures").fetchone() == {"n": 0}


def test_a_deadlock_in_the_erase_s_rewrite_rolls_it_back_and_it_runs_again(
        conn: Conn, db_url: str) -> None:
    """The residual case: the application holds a row the erase rewrites without taking it
    first (a message to ann), and calls pgcast_send_message while the erase waits for that row
    holding the erasure lock. Postgres fails the erase (it waited first) with 40P01; the erase
    rolls back all it did, starts again, waits for the commit and erases both messages."""
    seed(conn)
    old = conn.execute(SEND, (ACCOUNT, "ann@example.com")).fetchone()
    assert old is not None
    outcome: dict[str, Any] = {}
    with support.connect(db_url) as app:
        app.autocommit = False
        app.execute("SELECT 1 FROM messages WHERE id = %s FOR UPDATE", (old["id"],))
        eraser, pid = erase_in_thread(db_url, outcome)
        support.wait_for(lambda: blocked(conn, pid), timeout=30, what="the erase to wait")
        row = app.execute(SEND, (ACCOUNT, "ann@example.com")).fetchone()
        assert row is not None
        assert eraser.is_alive(), outcome
        app.commit()
        eraser.join(timeout=60)
        assert not eraser.is_alive()
    assert outcome == {"erase": "done"}
    assert conn.execute("SELECT array_agg(DISTINCT to_address) AS a FROM messages"
                        ).fetchone() == {"a": ["erased@erased.invalid"]}


def test_when_the_application_waited_first_it_is_the_one_failed_with_40p01(
        conn: Conn, db_url: str) -> None:
    """The other side of the residual case: the erase, in its rewrite, first waits for a row of
    a third session; meanwhile the application (holding a message row the erase needs next)
    calls pgcast_send_message and waits for the erasure lock. When the third session commits,
    the erase waits for the application's row and closes the circle; the application's wait
    is the older, so Postgres fails the application (40P01) and the erase goes on."""
    seed(conn)
    first = conn.execute(SEND, (ACCOUNT, "ann@example.com")).fetchone()
    second = conn.execute(SEND, (ACCOUNT, "ann@example.com")).fetchone()
    assert first is not None and second is not None
    # the erase locks the messages in id order: the third session's row first
    conn.execute("UPDATE messages SET id = '00000000-0000-0000-0000-000000000001' "
                 "WHERE id = %s", (first["id"],))
    conn.execute("UPDATE messages SET id = '00000000-0000-0000-0000-000000000002' "
                 "WHERE id = %s", (second["id"],))
    outcome: dict[str, Any] = {}
    with support.connect(db_url) as third, support.connect(db_url) as app:
        third.autocommit = app.autocommit = False
        third.execute("SELECT 1 FROM messages WHERE id = '00000000-0000-0000-0000-000000000001'"
                      " FOR UPDATE")
        app.execute("SELECT 1 FROM messages WHERE id = '00000000-0000-0000-0000-000000000002'"
                    " FOR UPDATE")
        eraser, pid = erase_in_thread(db_url, outcome)
        support.wait_for(lambda: blocked(conn, pid), timeout=30, what="the erase to wait")
        app_pid = app.info.backend_pid

        def send() -> None:
            try:
                app.execute(SEND, (ACCOUNT, "ann@example.com"))
                app.commit()
                outcome["app"] = "done"
            except psycopg.errors.DeadlockDetected:
                app.rollback()
                outcome["app"] = "deadlock"

        sender = threading.Thread(target=send)
        sender.start()
        support.wait_for(lambda: blocked(conn, app_pid), timeout=30, what="the send to wait")
        third.commit()
        sender.join(timeout=60)
        eraser.join(timeout=60)
        assert not sender.is_alive() and not eraser.is_alive()
    assert outcome == {"app": "deadlock", "erase": "done"}
    assert conn.execute("SELECT array_agg(DISTINCT to_address) AS a FROM messages"
                        ).fetchone() == {"a": ["erased@erased.invalid"]}
