"""pgcast_erase_v3 on its own: what it keeps (a keyed hash), and that it commits durably."""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg

from pgcast import schema
from pgcast.sql import contacts, migrate
from pgcast.sql.queries import QUERIES
from tests import support
from tests.integration import test_dispatch as d

Conn = psycopg.Connection[dict[str, Any]]


def keyed(conn: Conn, address: str) -> bytes:
    """The keyed hash contact_erasures keeps: sha256(k2 || sha256(k1 || sha256(address)))."""
    keys = conn.execute("SELECT k1, k2 FROM erasure_keys").fetchone()
    assert keys is not None
    inner = hashlib.sha256(keys["k1"] + hashlib.sha256(address.encode()).digest()).digest()
    return hashlib.sha256(keys["k2"] + inner).digest()


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
        assert kept == [{"account": "default", "email_hash": keyed(conn, "user0@example.com")}]
        # keyed (0012): the plain SHA-256 of the address is nowhere
        assert hashlib.sha256(b"user0@example.com").digest() != kept[0]["email_hash"]
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


def test_hashes_kept_before_0012_are_keyed_and_still_refuse_a_reimport(pg_server: str) -> None:
    """0009's rows were plain SHA-256s of the address: 0012 keys them in place."""
    upto = [m for m in schema.migrations() if m.version <= 11]
    with support.fresh_database(pg_server, "template0") as url, \
            psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        conn.execute(QUERIES["migrations_table"])
        for m in upto:
            conn.execute(m.sql)  # type: ignore[arg-type]
            conn.execute(QUERIES["migration_record"], {"version": m.version, "name": m.name})
        support.seed_contacts(conn, 2)
        conn.execute("SELECT * FROM pgcast_erase_v2('default', 'user0@example.com', 'sql', '{}')")
        conn.commit()
        migrate.migrate(conn)
        kept = conn.execute("SELECT email_hash FROM contact_erasures").fetchall()
        assert kept == [{"email_hash": keyed(conn, "user0@example.com")}]
        written = contacts.upsert(conn, "default", [{"email": "User0@example.com"},
                                                    {"email": "user1@example.com"}])
        assert (written.inserted, written.updated, len(written.erased)) == (0, 1, 1)


def test_the_erasure_check_answers_as_before_and_keeps_its_plan(conn: Conn) -> None:
    """pgcast_erased_v1 (plpgsql since 0035): the same answers as its SQL body, in a new
    transaction each time (as the sign-up's statements ask it), and a kept plan."""
    support.seed_contacts(conn, 1)
    conn.execute("SELECT * FROM pgcast_erase_v3('default', 'USER0@example.com', 'sql', '{}')")
    asked = [("default", "user0@example.com"), ("default", "  User0@Example.COM "),
             ("default", "user1@example.com"), ("other", "user0@example.com"),
             ("default", None)]
    for account, address in asked:
        row = conn.execute("SELECT pgcast_erased_v1(%s, %s) AS now, EXISTS ("
                           "  SELECT 1 FROM contact_erasures e, erasure_keys k"
                           "  WHERE e.account = %s AND e.email_hash = sha256(k.k2 || sha256("
                           "    k.k1 || sha256(convert_to(lower(btrim(%s)), 'UTF8'))))) AS body",
                           (account, address, account, address)).fetchone()
        assert row is not None and row["now"] == row["body"], (account, address)
        assert row["now"] == (account == "default" and address is not None
                              and address.strip().lower() == "user0@example.com")
    fn = conn.execute("SELECT l.lanname, p.proconfig FROM pg_proc p JOIN pg_language l "
                      "ON l.oid = p.prolang WHERE p.proname = 'pgcast_erased_v1'").fetchone()
    # a SQL body with a subquery is planned in every statement; a plpgsql one keeps its plan,
    # pinned generic since a caller's force_custom_plan (the messages' handoff) reaches it
    assert fn == {"lanname": "plpgsql", "proconfig": ["plan_cache_mode=force_generic_plan"]}
