"""pgcast_erase_v3 on its own: what it keeps, and that it commits durably whatever the setting."""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg

from tests import support
from tests.integration import test_dispatch as d

Conn = psycopg.Connection[dict[str, Any]]


def test_erase_pins_synchronous_commit_and_keeps_only_the_hash(db_url: str) -> None:
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as conn:
        support.seed_contacts(conn, 1)
        conn.execute("SET LOCAL synchronous_commit = off")
        row = conn.execute("SELECT * FROM pgcast_erase_v3('default', 'USER0@example.com', "
                           "'sql', '{}')").fetchone()
        assert row is not None and row["contact_id"] is not None
        # set_config(..., true) inside the function holds to the end of this transaction
        assert conn.execute("SHOW synchronous_commit").fetchone() == {
            "synchronous_commit": "on"}
        conn.commit()
        kept = conn.execute("SELECT account, email_hash FROM contact_erasures").fetchall()
        assert kept == [{"account": "default",
                         "email_hash": hashlib.sha256(b"user0@example.com").digest()}]
        assert conn.execute("SELECT count(*) AS n FROM contacts").fetchone() == {"n": 0}
        event = conn.execute("SELECT contact_id, action FROM contact_events").fetchone()
        assert event == {"contact_id": row["contact_id"], "action": "erase"}


def test_an_erased_contact_still_in_a_sending_broadcast_is_skipped_not_mailed(
        conn: Conn) -> None:
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn)
    token, rows = d.claim(conn, bid, 10)
    erased = conn.execute("SELECT * FROM pgcast_erase_v3('default', 'user0@example.com', "
                          "'sql', '{}')").fetchone()
    assert erased is not None
    handed = d.handoff(conn, bid, rows[0]["epoch"], token, [r["contact_id"] for r in rows])
    assert [h["email"] for h in handed] == ["user1@example.com"]
    left = {r["email"]: r["status"] for r in conn.execute(
        "SELECT email, status FROM broadcast_recipients").fetchall()}
    assert left == {f"erased-{erased['contact_id']}@erased.invalid": "skipped",
                    "user1@example.com": "sending"}
    assert conn.execute("SELECT last_error FROM broadcast_recipients WHERE status = 'skipped'"
                        ).fetchone() == {"last_error": "contact erased"}
    support.assert_counters_true(conn, bid)


def test_erase_scrubs_the_archive_too(conn: Conn) -> None:
    """Right to erasure: an archived broadcast (retention, 0010) keeps no trace of the address."""
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn)
    ids = {r["email"]: r["contact_id"] for r in conn.execute(
        "SELECT email, contact_id FROM broadcast_recipients WHERE broadcast_id = %s", (bid,))}
    # as retention leaves it: the rows in the archive, the broadcast marked archived
    conn.execute("INSERT INTO broadcast_recipients_archive (broadcast_id, contact_id, status, "
                 "email, provider_message_id, last_error) SELECT broadcast_id, contact_id, "
                 "'sent', email, 'm' || contact_id, 'x' FROM broadcast_recipients "
                 "WHERE broadcast_id = %s", (bid,))
    conn.execute("UPDATE broadcasts SET archived_at = now() WHERE id = %s", (bid,))
    conn.execute("SELECT * FROM pgcast_erase_v3('default', 'USER0@example.com', 'sql', '{}')")
    rows = {r["contact_id"]: r for r in conn.execute(
        "SELECT contact_id, email, last_error FROM broadcast_recipients_archive")}
    erased = rows[ids["user0@example.com"]]
    assert erased["email"].endswith("@erased.invalid") and erased["last_error"] is None
    assert rows[ids["user1@example.com"]]["email"] == "user1@example.com"
    assert conn.execute("SELECT count(*) AS n FROM broadcast_recipients_all "
                        "WHERE lower(email) = 'user0@example.com'").fetchone() == {"n": 0}
