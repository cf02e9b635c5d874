"""`broadcast show|edit|delete` and `contacts add`: a typo fixed from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg

from tests import support

Conn = psycopg.Connection[dict[str, Any]]


def create(db_url: str, tmp_path: Path, subject: str = "Helo") -> str:
    body = tmp_path / "body.txt"
    body.write_text("Hi {{ contact.name }}")
    return support.pgcast(db_url, "broadcast", "create", "--subject", subject, "--from",
                          "news@example.com", "--text", str(body)).stdout.strip()


def test_show_edit_and_delete_a_draft(conn: Conn, db_url: str, tmp_path: Path) -> None:
    bid = create(db_url, tmp_path)
    shown = json.loads(support.pgcast(db_url, "broadcast", "show", bid[:8]).stdout)
    assert (shown["id"], shown["subject"], shown["text"]) == (bid, "Helo", "Hi {{ contact.name }}")
    html = tmp_path / "b.html"
    html.write_text("<p>Hi</p>")
    edited = json.loads(support.pgcast(
        db_url, "broadcast", "edit", bid, "--subject", "Hello", "--html", str(html),
        "--no-text", "--priority", "3", "--actor", "ann").stdout)
    assert (edited["subject"], edited["text"], edited["html"], edited["priority"]) == (
        "Hello", None, "<p>Hi</p>", 3)
    assert edited["warnings"]  # no unsubscribe link: said, as at create
    row = conn.execute("SELECT subject, text_body, audit_log FROM broadcasts WHERE id = %s",
                       (bid,)).fetchone()
    assert row is not None and (row["subject"], row["text_body"]) == ("Hello", None)
    assert row["audit_log"][-1]["action"] == "edit"
    assert row["audit_log"][-1]["details"]["user"] == "ann"
    copy = support.pgcast(db_url, "broadcast", "copy", bid).stdout.strip()
    assert json.loads(support.pgcast(db_url, "broadcast", "show", copy).stdout)[
        "subject"] == "Hello"  # the copy has the fix
    gone = json.loads(support.pgcast(db_url, "broadcast", "delete", bid).stdout)
    assert gone["success"] is True
    assert conn.execute("SELECT count(*) AS n FROM broadcasts WHERE id = %s",
                        (bid,)).fetchone() == {"n": 0}


def test_a_scheduled_broadcast_is_edited_and_keeps_its_time(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    bid = create(db_url, tmp_path)
    support.pgcast(db_url, "broadcast", "schedule", bid, "--at", "2099-01-01T09:00:00Z")
    edited = json.loads(support.pgcast(db_url, "broadcast", "edit", bid,
                                       "--subject", "Hello").stdout)
    assert (edited["status"], edited["subject"]) == ("scheduled", "Hello")
    assert edited["scheduled_at"].startswith("2099-01-01T09:00:00")
    refused = support.pgcast(db_url, "broadcast", "delete", bid, check=False)
    assert refused.returncode == 1
    assert json.loads(refused.stdout) == {
        "success": False, "status": "scheduled",
        "message": "Broadcast is scheduled; only a draft can be deleted"}


def test_a_broadcast_that_started_is_not_edited(conn: Conn, db_url: str, tmp_path: Path) -> None:
    support.seed_contacts(conn, 2)
    bid = create(db_url, tmp_path)
    support.pgcast(db_url, "broadcast", "send", bid)
    refused = support.pgcast(db_url, "broadcast", "edit", bid, "--subject", "x", check=False)
    assert refused.returncode == 1
    assert json.loads(refused.stdout) == {
        "success": False, "status": "sending",
        "message": "Broadcast is sending; only a draft or a scheduled broadcast can be edited"}
    assert conn.execute("SELECT subject FROM broadcasts WHERE id = %s",
                        (bid,)).fetchone() == {"subject": "Helo"}


def test_bad_edits_are_one_line_exit_2(conn: Conn, db_url: str, tmp_path: Path) -> None:
    bid = create(db_url, tmp_path)
    for args, words in ((["--from", "not an address"], "from"),
                        ([], "nothing to change"),
                        (["--text", str(tmp_path / "missing.txt")], "cannot read"),
                        (["--no-text"], "text or html"),
                        (["--subject", "{{ contact.nope( }}"], "")):
        done = support.pgcast(db_url, "broadcast", "edit", bid, *args, check=False)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.startswith("pgcast: error:") and words in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert conn.execute("SELECT subject, text_body FROM broadcasts WHERE id = %s",
                        (bid,)).fetchone() == {"subject": "Helo",
                                               "text_body": "Hi {{ contact.name }}"}


def test_contacts_add_inserts_then_merges(conn: Conn, db_url: str) -> None:
    first = json.loads(support.pgcast(db_url, "contacts", "add", "Ann@Example.com", "--name",
                                      "Ann", "--tag", "vip", "--attr", "plan=pro").stdout)
    assert first == {"success": True, "email": "Ann@example.com", "inserted": True}
    again = json.loads(support.pgcast(db_url, "contacts", "add", "ann@example.com", "--tag",
                                      "beta", "--attr", "city=Oslo").stdout)
    assert again["inserted"] is False
    row = conn.execute("SELECT name, tags, attributes FROM contacts").fetchone()
    # as an import row: tags given replace the stored ones, a name not given stays
    assert row == {"name": "Ann", "tags": ["beta"],
                   "attributes": {"plan": "pro", "city": "Oslo"}}
    bad = support.pgcast(db_url, "contacts", "add", "not-an-address", check=False)
    assert bad.returncode == 2 and "not-an-address" in bad.stderr
    bad = support.pgcast(db_url, "contacts", "add", "b@example.com", "--attr", "novalue",
                         check=False)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    assert conn.execute("SELECT count(*) AS n FROM contacts").fetchone() == {"n": 1}


def test_contacts_add_refuses_an_erased_address(conn: Conn, db_url: str) -> None:
    support.pgcast(db_url, "contacts", "add", "gone@example.com")
    support.pgcast(db_url, "contacts", "erase", "gone@example.com")
    done = support.pgcast(db_url, "contacts", "add", "gone@example.com", check=False)
    assert done.returncode == 1
    assert json.loads(done.stdout)["success"] is False
    assert conn.execute("SELECT count(*) AS n FROM contacts").fetchone() == {"n": 0}


def test_schedule_and_lookup_print_iso_8601_and_name_the_flags(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    bid = create(db_url, tmp_path)
    done = support.pgcast(db_url, "broadcast", "schedule", bid, "--at", "2099-01-01T09:00:00Z")
    assert '"scheduled_at": "2099-01-01T09:00:00+00:00"' in done.stdout
    support.pgcast(db_url, "broadcast", "unschedule", bid)
    for args, words in ((["--at", "2020-01-01T00:00:00Z"], "--at is in the past"),
                        (["--at", "2099-01-02T00:00:00Z", "--not-after", "2099-01-01T00:00:00Z"],
                         "--not-after must not be earlier than --at")):
        bad = support.pgcast(db_url, "broadcast", "schedule", bid, *args, check=False)
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr
    support.seed_contacts(conn, 1)
    support.pgcast(db_url, "broadcast", "send", bid)
    support.pgcast(db_url, "worker", "--once", env=support.pgcast_env(
        db_url, PGCAST_PROVIDER="null"))
    email = conn.execute("SELECT email FROM contacts").fetchone()
    assert email is not None
    found = support.pgcast(db_url, "lookup", bid[:8], email["email"])  # a prefix, as elsewhere
    row = json.loads(found.stdout)
    assert row["status"] == "sent" and "T" in row["sent_at"]
    short = support.pgcast(db_url, "lookup", bid[:4], email["email"], check=False)
    assert short.returncode == 2 and "8+ characters" in short.stderr


def test_an_unsubscribe_from_the_cli_is_recorded_in_contact_events(
        conn: Conn, db_url: str) -> None:
    support.pgcast(db_url, "contacts", "add", "ann@example.com")
    done = json.loads(support.pgcast(db_url, "contacts", "unsubscribe", "ann@example.com",
                                     "--actor", "ops").stdout)
    again = json.loads(support.pgcast(db_url, "contacts", "unsubscribe", "ann@example.com").stdout)
    assert again["unsubscribed_at"] == done["unsubscribed_at"]  # the first time is kept
    events = conn.execute("SELECT action, source, actor->>'user' AS who FROM contact_events"
                          ).fetchall()
    assert events == [{"action": "unsubscribe", "source": "cli", "who": "ops"}]  # once
