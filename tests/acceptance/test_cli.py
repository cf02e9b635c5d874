"""The `pgcast` command line: contract output, one-line errors with exit 2, nothing changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg

from tests import support

Conn = psycopg.Connection[dict[str, Any]]


def counts(conn: Conn) -> tuple[int, int]:
    row = conn.execute("SELECT (SELECT count(*) FROM contacts) AS c, "
                       "(SELECT count(*) FROM broadcasts) AS b").fetchone()
    assert row is not None
    return row["c"], row["b"]


def test_import_reports_rows_and_rejections(conn: Conn, db_url: str, tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("email,name,tags\na@example.com,Ann,vip;beta\nnot-an-address,Bob,\n"
                   "B@Example.com,Bea,\nb@example.com,Bea Two,vip\n")
    done = support.pgcast(db_url, "contacts", "import", str(csv), check=False)
    assert done.returncode == 1  # a row was rejected; the others are imported
    assert json.loads(done.stdout) == {"imported": 2, "inserted": 2, "updated": 0, "merged": 1,
                                       "normalised": 1, "rejected": 1}
    assert "line 3: not-an-address:" in done.stderr
    rows = conn.execute("SELECT email, name, tags FROM contacts ORDER BY email").fetchall()
    assert rows == [{"email": "a@example.com", "name": "Ann", "tags": ["vip", "beta"]},
                    {"email": "b@example.com", "name": "Bea Two", "tags": ["vip"]}]


def test_create_send_status_cancel(conn: Conn, db_url: str, tmp_path: Path) -> None:
    support.seed_contacts(conn, 12, tag="vip")
    body = tmp_path / "body.txt"
    body.write_text("Hi there")
    bid = support.pgcast(db_url, "broadcast", "create", "--subject", "News", "--from",
                         "Team <team@example.com>", "--text", str(body), "--tag",
                         "vip").stdout.strip()
    sent = json.loads(support.pgcast(db_url, "broadcast", "send", bid).stdout)
    assert sent == {"success": True, "status": "sending", "queued": 12,
                    "message": "Broadcast queued for 12 recipients"}
    status = json.loads(support.pgcast(db_url, "broadcast", "status", bid).stdout)
    assert (status["status"], status["total"], status["pending"]) == ("sending", 12, 12)
    cancel = json.loads(support.pgcast(db_url, "broadcast", "cancel", bid).stdout)
    assert cancel["success"] is True and cancel["alreadyQueued"] == 0
    again = support.pgcast(db_url, "broadcast", "cancel", bid, check=False)
    assert again.returncode == 1 and json.loads(again.stdout)["success"] is False
    listing = support.pgcast(db_url, "broadcast", "list").stdout
    assert bid in listing and "cancelled" in listing


def test_bad_input_is_one_line_exit_2_and_changes_nothing(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    body = tmp_path / "body.txt"
    body.write_text("x")
    cases = [
        ["broadcast", "create", "--subject", "S", "--from", "nope", "--text", str(body)],
        ["broadcast", "create", "--subject", "S", "--from", "a@example.com"],
        ["broadcast", "create", "--subject", "S", "--from", "a@example.com", "--text",
         str(tmp_path / "missing.txt")],
        ["broadcast", "send", "not-a-uuid"],
        ["broadcast", "send", "6f1c7c62-36f6-4b8e-9d4e-51c0a2f4e0a1"],
        ["contacts", "import", str(tmp_path / "missing.csv")],
        ["contacts", "unsubscribe", "nobody@example.com"],
        ["worker", "--concurrency", "zero"],
        ["worker", "--group-size", "0"],
        ["worker", "--group-size", "some"],
        ["worker", "--group-ms", "0"],
        ["rate", "set", "-5"],
        ["rate", "weight", "acme", "0"],
        ["rate", "weight", "acme", "1001"],
        ["rate", "weight", "acme", "two"],
        ["broadcast", "create", "--subject", "S", "--from", "a@example.com", "--text",
         str(body), "--priority", "11"],
        ["broadcast", "create", "--subject", "S", "--from", "a@example.com", "--text",
         str(body), "--priority", "0"],
        ["frobnicate"],
    ]
    before = counts(conn)
    for args in cases:
        done = support.pgcast(db_url, *args, check=False)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert counts(conn) == before


def test_unmigrated_database_says_so(pg_server: str) -> None:
    with support.fresh_database(pg_server, "template0") as url:
        done = support.pgcast(url, "broadcast", "list", check=False)
    assert done.returncode == 2
    assert "pgcast migrate" in done.stderr


def test_priority_weight_and_rate_show(db_url: str, conn: Any, tmp_path: Path) -> None:
    """`broadcast create --priority`, `rate weight`, and `rate show` with weights and shares."""
    body = tmp_path / "body.txt"
    body.write_text("x")
    bid = support.pgcast(db_url, "broadcast", "create", "--subject", "S", "--from",
                         "a@example.com", "--text", str(body), "--priority", "7").stdout.strip()
    row = conn.execute("SELECT priority FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert row["priority"] == 7
    weight = json.loads(support.pgcast(db_url, "rate", "weight", "acme", "3").stdout)
    assert (weight["account"], weight["weight"]) == ("acme", 3)
    support.pgcast(db_url, "rate", "set", "50")
    show = json.loads(support.pgcast(db_url, "rate", "show").stdout)
    assert (show["name"], show["rate"]) == ("global", 50.0)
    assert [(w["account"], w["weight"]) for w in show["weights"]] == [("acme", 3)]
    assert show["shares"] == []  # nobody takes tokens now
