"""`pgcast contacts import` through the real executable: the file-level and row-level rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from tests import support

Conn = psycopg.Connection[dict[str, Any]]
PGCAST = str(Path(sys.executable).parent / "pgcast")  # the console script `make install` puts


def run(db_url: str, *args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The installed `pgcast` executable, to completion, whatever its exit code."""
    return subprocess.run([PGCAST, *args], env=env or support.pgcast_env(db_url),
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def contacts_of(conn: Conn) -> list[dict[str, Any]]:
    return conn.execute("SELECT email, name, tags, attributes, unsubscribed_at, suppressed_reason "
                        "FROM contacts ORDER BY lower(email)").fetchall()


def shape(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["email"], row["name"], row["tags"], row["attributes"],
            row["unsubscribed_at"] is not None, row["suppressed_reason"])


def test_a_latin1_byte_is_one_line_naming_its_line_exit_2_nothing_imported(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "latin1.csv"
    good = "".join(f"u{i}@example.com,User {i},\n" for i in range(1000))
    f.write_bytes(b"email,name,tags\n" + good.encode() + b"z@example.com,Ren\xe9e,\n")
    done = run(db_url, "contacts", "import", str(f))
    assert done.returncode == 2, done
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert "line 1002" in done.stderr and "--encoding" in done.stderr
    assert contacts_of(conn) == []
    done = run(db_url, "contacts", "import", "--encoding", "latin-1", str(f))
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["imported"] == 1001
    assert conn.execute("SELECT name FROM contacts WHERE email = 'z@example.com'"
                        ).fetchone() == {"name": "Renée"}


def test_file_level_problems_exit_2_and_import_nothing(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    cases = {"unterminated.csv": 'email,name\na@example.com,"Ann\n',
             "dupe_header.csv": "email,name,Name\na@example.com,A,B\n",
             "no_email.csv": "name,tags\nAnn,\n",
             "empty.csv": ""}
    for name, text in cases.items():
        f = tmp_path / name
        f.write_text(text)
        done = run(db_url, "contacts", "import", str(f))
        assert done.returncode == 2, (name, done)
        assert len(done.stderr.strip().splitlines()) == 1, (name, done.stderr)
        assert "Traceback" not in done.stderr
    done = run(db_url, "contacts", "import", "--encoding", "klingon", str(tmp_path / "empty.csv"))
    assert done.returncode == 2 and "unknown encoding" in done.stderr
    assert contacts_of(conn) == []


def test_control_characters_and_nul_are_rejected_per_row_the_rest_imported(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text('email,name,tags\n'
                 'a@example.com,Ann,\n'
                 'b@example.com,"Bo\x00b",\n'
                 'c@example.com,"Cy\nBcc: evil@example.com",\n'
                 'd@example.com,Dee\u2028,\n'
                 'e@example.com,Eve,ok\x0btag\n'
                 'f@example.com,Fay,one,two,three\n'
                 'g@example.com,Gil,\n', encoding="utf-8")
    done = run(db_url, "contacts", "import", str(f))
    assert done.returncode == 1, done  # some rows rejected, the others imported
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["line 3", "line 4", "line 6", "line 7",
                                                  "line 8"]
    assert "NUL" in lines[0] and "LF" in lines[1] and "U+2028" in lines[2]
    assert "VT" in lines[3] and "5 fields, the header has 3" in lines[4]
    assert json.loads(done.stdout)["rejected"] == 5
    assert [c["email"] for c in contacts_of(conn)] == ["a@example.com", "g@example.com"]


def test_report_counts_merged_rows_and_says_what_it_normalised(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text("email,name,tags\nann@example.com,Ann,\nAnn@Example.COM,,vip\n"
                 "bob@BÜCHER.example,Bob,\n")
    done = run(db_url, "contacts", "import", str(f))
    assert done.returncode == 0, done
    assert json.loads(done.stdout) == {"imported": 2, "inserted": 2, "updated": 0, "merged": 1,
                                       "normalised": 2, "rejected": 0}
    assert "line 3: Ann@Example.COM stored as Ann@example.com" in done.stderr
    assert "line 4: bob@BÜCHER.example stored as bob@xn--bcher-kva.example" in done.stderr
    # line 2's spelling gave way to line 3's: said, not silent
    assert ("line 2: ann@example.com stored as Ann@example.com (a later row spells the same "
            "address so; the later spelling is kept)") in done.stderr
    # the merge keeps the first row's name (the second's cell was empty) and adds its tags
    assert [(c["email"], c["name"], c["tags"]) for c in contacts_of(conn)] == [
        ("Ann@example.com", "Ann", ["vip"]), ("bob@xn--bcher-kva.example", "Bob", [])]


def test_empty_cells_keep_fields_attributes_merge_and_replace_replaces(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text("email,name,tags,plan,city\na@example.com,Ann,vip;beta,gold,Oslo\n")
    assert run(db_url, "contacts", "import", str(f)).returncode == 0
    f.write_text("email,name,tags,plan,team\na@example.com,,,silver,red\n")
    assert run(db_url, "contacts", "import", str(f)).returncode == 0
    [c] = contacts_of(conn)
    assert (c["name"], c["tags"]) == ("Ann", ["vip", "beta"])
    assert c["attributes"] == {"plan": "silver", "city": "Oslo", "team": "red"}
    f.write_text("email,name,tags,plan\na@example.com,,news,bronze\n")
    done = run(db_url, "contacts", "import", "--replace", str(f))
    assert json.loads(done.stdout)["updated"] == 1
    [c] = contacts_of(conn)
    assert (c["name"], c["tags"], c["attributes"]) == ("", ["news"], {"plan": "bronze"})


def test_import_never_resubscribes_or_unsuppresses(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    conn.execute("INSERT INTO contacts (account, email, unsubscribed_at, suppressed_at, "
                 "suppressed_reason) VALUES ('default', 'a@example.com', now(), NULL, NULL), "
                 "('default', 'b@example.com', NULL, now(), 'bounce')")
    f = tmp_path / "c.csv"
    f.write_text("email,name,unsubscribed_at,suppressed_reason\n"
                 "a@example.com,Ann,,\nb@example.com,Bob,,\n")
    for flags in ([], ["--replace"]):
        assert run(db_url, "contacts", "import", *flags, str(f)).returncode == 0
        rows = contacts_of(conn)
        assert rows[0]["unsubscribed_at"] is not None
        assert rows[1]["suppressed_reason"] == "bounce"


def test_an_unsubscribe_or_suppression_an_import_adds_is_in_contact_events(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    conn.execute("INSERT INTO contacts (account, email, unsubscribed_at) VALUES "
                 "('default', 'old@example.com', now())")
    f = tmp_path / "c.csv"
    f.write_text("email,name,unsubscribed_at,suppressed_reason\n"
                 "old@example.com,Old,2026-01-01T00:00:00+00:00,\n"
                 "new@example.com,New,2026-01-01T00:00:00+00:00,\n"
                 "sup@example.com,Sup,,complaint\n"
                 "fine@example.com,Fine,,\n")
    for _ in range(2):  # a second import of the same file adds nothing
        assert run(db_url, "contacts", "import", str(f)).returncode == 0
        events = conn.execute(
            "SELECT c.email, e.action, e.source, e.details FROM contact_events e "
            "JOIN contacts c ON c.id = e.contact_id ORDER BY c.email, e.action").fetchall()
        assert [(e["email"], e["action"], e["source"]) for e in events] == [
            ("new@example.com", "unsubscribe", "import"),
            ("sup@example.com", "suppress", "import")]
        assert events[1]["details"] == {"reason": "complaint"}


def test_export_then_import_elsewhere_never_mails_anyone_who_left(
        conn: Conn, db_url: str, pg_server: str, template_db: str, tmp_path: Path) -> None:
    f = tmp_path / "in.csv"
    f.write_text("email,name,tags,plan\na@example.com,Zoë,vip,gold\nb@example.com,Bo,,\n"
                 "c@example.com,Cy,vip,\n")
    assert run(db_url, "contacts", "import", str(f)).returncode == 0
    assert run(db_url, "contacts", "unsubscribe", "b@example.com").returncode == 0
    conn.execute("UPDATE contacts SET suppressed_at = now(), suppressed_reason = 'complaint' "
                 "WHERE email = 'c@example.com'")
    out = tmp_path / "out.csv"
    done = run(db_url, "contacts", "export", str(out))
    assert json.loads(done.stdout) == {"exported": 3, "file": str(out)}
    text = out.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "email,name,tags,plan,unsubscribed_at,suppressed_reason"
    assert "a@example.com,Zoë,vip,gold,," in text
    with support.fresh_database(pg_server, template_db) as other:
        done = run(other, "contacts", "import", str(out))
        assert done.returncode == 0, done
        with support.connect(other) as c2:
            assert [shape(r) for r in contacts_of(c2)] == [shape(r) for r in contacts_of(conn)]
            bid = support.new_broadcast(c2, send=False)
            sent = json.loads(run(other, "broadcast", "send", str(bid)).stdout)
            assert sent["success"], sent
            mailed = c2.execute("SELECT email FROM broadcast_recipients").fetchall()
            assert {"email": "b@example.com"} not in mailed


def test_erase_keeps_nothing_but_a_hash_and_a_reimport_is_refused(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text("email,name,tags,plan\nann@example.com,Ann Example,vip,gold\n"
                 "bob@example.com,Bob,vip,\n")
    assert run(db_url, "contacts", "import", str(f)).returncode == 0
    bid = support.new_broadcast(conn, send=False)
    assert json.loads(run(db_url, "broadcast", "send", str(bid)).stdout)["queued"] == 2
    conn.execute("UPDATE broadcast_recipients SET last_error = 'mailbox ann@example.com full' "
                 "WHERE email = 'ann@example.com'")
    done = run(db_url, "contacts", "erase", "Ann@Example.com", "--actor", "dpo")
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["recipient_rows"] == 1
    dump = json.dumps([conn.execute(f"SELECT * FROM {t}").fetchall()  # noqa: S608
                       for t in ("contacts", "broadcast_recipients", "contact_events")],
                      default=str)
    assert "ann" not in dump.lower() and "gold" not in dump
    event = conn.execute("SELECT action, source, actor FROM contact_events").fetchone()
    assert event is not None
    assert (event["action"], event["source"], event["actor"]["user"]) == ("erase", "cli", "dpo")
    done = run(db_url, "contacts", "import", str(f))
    assert done.returncode == 1
    assert "line 2: ann@example.com: erased at the person's request" in done.stderr
    assert json.loads(done.stdout)["updated"] == 1  # bob
    assert conn.execute("SELECT count(*) AS n FROM contacts WHERE lower(email) LIKE 'ann%'"
                        ).fetchone() == {"n": 0}
    # erasing an address nobody has is answered, and keeps it from being imported
    done = run(db_url, "contacts", "erase", "nobody@example.com")
    assert json.loads(done.stdout)["erased"] is False
    assert os.environ.get("PGCAST_HOME")  # the tests' own home, never the user's
