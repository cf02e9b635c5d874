"""Real `pgcast` processes: personalised .eml files, one-click unsubscribe, previews, test sends."""

from __future__ import annotations

import email
import email.policy
import json
from pathlib import Path
from typing import Any

import psycopg

from pgcast.sql import broadcasts
from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
TEXT = ("Dear {{ contact.name | default('friend', true) }},\n"
        "your plan: {{ contact.attributes.plan | default('free') }}.\n"
        "Unsubscribe: {{ unsubscribe_url }}\n"
        "{% if 'vip' in contact.tags %}VIP{% endif %}\n")
HTML = ('<p>Dear {{ contact.name | default("friend", true) }}</p>'
        '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>')


def file_env(db_url: str, outbox: Path) -> dict[str, str]:
    return support.pgcast_env(db_url, PGCAST_PROVIDER="file", PGCAST_OUTBOX_DIR=str(outbox))


def read(path: Path) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def body(parsed: email.message.EmailMessage, subtype: str) -> str:
    part = parsed.get_body(preferencelist=(subtype,))
    assert part is not None
    return str(part.get_content())  # type: ignore[attr-defined]


def test_personalised_eml_and_one_click_unsubscribe_skips_the_next_broadcast(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    conn.execute("INSERT INTO contacts (account, email, name, attributes, tags) VALUES "
                 "('default', 'ann@example.com', 'Ann', '{\"plan\": \"pro\"}', '{vip}'), "
                 "('default', 'bob@example.com', '', '{}', '{}'), "
                 "('default', 'cy@example.com', 'Cy', '{}', '{}')")
    ids = {r["email"]: r["id"] for r in conn.execute("SELECT id, email FROM contacts")}
    first = broadcasts.create(conn, "default", subject="Hi {{ contact.name }}",
                              from_address="News <news@example.com>", text=TEXT, html=HTML)
    broadcasts.send(conn, "default", first["id"])
    outbox = tmp_path / "outbox"
    support.pgcast(db_url, "worker", "--once", env=file_env(db_url, outbox))
    ann = read(outbox / str(first["id"]) / f"{ids['ann@example.com']}.eml")
    bob = read(outbox / str(first["id"]) / f"{ids['bob@example.com']}.eml")
    assert str(ann["Subject"]) == "Hi Ann" and str(bob["Subject"]) == "Hi"
    assert body(ann, "plain").startswith("Dear Ann,\r\nyour plan: pro.\r\n")
    assert "Dear friend," in body(bob, "plain") and "your plan: free." in body(bob, "plain")
    # contact.tags is read at the handoff like the name and the attributes
    assert "VIP" in body(ann, "plain") and "VIP" not in body(bob, "plain")
    assert "<p>Dear friend</p>" in body(bob, "html")
    link = str(bob["List-Unsubscribe"]).strip("<>")
    assert str(bob["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    assert link in body(bob, "plain") and link in body(bob, "html")
    assert link != str(ann["List-Unsubscribe"]).strip("<>")
    path = "/" + link.split("/", 3)[3]
    with h.client(db_url) as public:  # what a mail client does: no token, no cookie
        assert public.get(path).status_code == 200
        assert conn.execute("SELECT count(*) AS n FROM contacts "
                            "WHERE unsubscribed_at IS NOT NULL").fetchone() == {"n": 0}
        r = public.post(path, content=b"List-Unsubscribe=One-Click",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200
    second = broadcasts.create(conn, "default", subject="Again", from_address="news@example.com",
                               text="Hello {{ unsubscribe_url }}")
    assert broadcasts.send(conn, "default", second["id"])["queued"] == 2
    support.pgcast(db_url, "worker", "--once", env=file_env(db_url, outbox))
    got = {p.name for p in (outbox / str(second["id"])).glob("*.eml")}
    assert got == {f"{ids['ann@example.com']}.eml", f"{ids['cy@example.com']}.eml"}


def test_cli_create_checks_templates_and_warns_preview_renders(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("Hello\n{% if contact.name %}\n")
    done = support.pgcast(db_url, "broadcast", "create", "--subject", "S", "--from",
                          "news@example.com", "--text", str(bad), check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "text, line 2" in done.stderr
    plain = tmp_path / "plain.txt"
    plain.write_text("Hello {{ contact.name }}")
    made = support.pgcast(db_url, "broadcast", "create", "--subject", "S {{ contact.email }}",
                          "--from", "news@example.com", "--text", str(plain))
    assert "warning: neither text nor html shows {{ unsubscribe_url }}" in made.stderr
    bid = made.stdout.strip()
    conn.execute("INSERT INTO contacts (account, email, name) VALUES "
                 "('default', 'zoe@example.com', 'Zoë')")
    # an id prefix of 8 characters is enough, as for every broadcast command
    shown = json.loads(support.pgcast(db_url, "broadcast", "preview", bid[:8]).stdout)
    assert (shown["subject"], shown["text"], shown["contact"]) == (
        "S zoe@example.com", "Hello Zoë", "zoe@example.com")
    assert shown["headers"]["To"].endswith("<zoe@example.com>")
    assert shown["headers"]["List-Unsubscribe"].startswith("<http://127.0.0.1:8080/u/")


def test_a_test_send_reaches_the_outbox_through_a_running_worker(
        conn: Conn, db_url: str, tmp_path: Path, procs: support.Processes) -> None:
    conn.execute("INSERT INTO contacts (account, email, name) VALUES "
                 "('default', 'ann@example.com', 'Ann')")
    draft = broadcasts.create(conn, "default", subject="Hi {{ contact.name }}",
                              from_address="news@example.com", text=TEXT)
    outbox = tmp_path / "outbox"
    procs.start(db_url, "worker", PGCAST_PROVIDER="file", PGCAST_OUTBOX_DIR=str(outbox))
    done = support.pgcast(db_url, "broadcast", "test", str(draft["id"]), "--to",
                          "me@example.com", "--contact", "ann@example.com", "--timeout", "120",
                          check=False, timeout=180)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["status"] == "sent" and outcome["message_id"].startswith("<")
    (eml,) = (outbox / str(draft["id"])).glob("test-*.eml")
    parsed = read(eml)
    assert str(parsed["Subject"]) == "[TEST] Hi Ann"
    assert [a.addr_spec for a in parsed["To"].addresses] == ["me@example.com"]
    assert "Dear Ann," in body(parsed, "plain")
    row = conn.execute("SELECT status, total, audit_log FROM broadcasts WHERE id = %s",
                       (draft["id"],)).fetchone()
    assert row is not None and (row["status"], row["total"]) == ("draft", 0)
    assert row["audit_log"][-1]["action"] == "test"
    assert row["audit_log"][-1]["details"]["to"] == ["me@example.com"]
    # its unsubscribe link is inert: the page, and nobody unsubscribed
    path = "/" + str(parsed["List-Unsubscribe"]).strip("<>").split("/", 3)[3]
    with h.client(db_url) as public:
        r = public.post(path, content=b"List-Unsubscribe=One-Click",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and "nobody was unsubscribed" in r.text
    assert conn.execute("SELECT count(*) AS n FROM contacts "
                        "WHERE unsubscribed_at IS NOT NULL").fetchone() == {"n": 0}


def test_a_test_send_without_a_worker_times_out_and_never_goes_out_later(
        conn: Conn, db_url: str, tmp_path: Path, procs: support.Processes) -> None:
    draft = broadcasts.create(conn, "default", subject="Hi", from_address="news@example.com",
                              text="x {{ unsubscribe_url }}")
    done = support.pgcast(db_url, "broadcast", "test", str(draft["id"]), "--to",
                          "me@example.com", "--timeout", "1", check=False)
    assert done.returncode == 1 and "within 1s" in done.stderr
    assert "withdrawn and will not be sent" in done.stderr
    row = conn.execute("SELECT status, error FROM test_sends").fetchone()
    assert row == {"status": "failed", "error": "withdrawn: no worker took it within 1s"}
    # a worker that starts afterwards runs the queued job and sends nothing
    outbox = tmp_path / "outbox"
    procs.start(db_url, "worker", PGCAST_PROVIDER="file", PGCAST_OUTBOX_DIR=str(outbox))
    # (the workers delete a job that succeeded)
    support.wait_for(lambda: conn.execute(
        "SELECT count(*) AS n FROM procrastinate_jobs WHERE task_name = 'pgcast.test_send'"
    ).fetchone() == {"n": 0}, what="the worker to run the queued test-send job")
    assert not list(outbox.rglob("*.eml"))
    assert conn.execute("SELECT status FROM test_sends").fetchone() == {"status": "failed"}


def test_a_ses_worker_refuses_to_start_without_public_url_and_secret(db_url: str) -> None:
    base = {"PGCAST_PROVIDER": "ses", "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    secret = "s" * 32
    for extra in ({}, {"PGCAST_PUBLIC_URL": "https://mail.example"},
                  {"PGCAST_UNSUBSCRIBE_SECRET": secret}):
        env = support.pgcast_env(db_url, **base, **extra)
        for name in ("PGCAST_PUBLIC_URL", "PGCAST_UNSUBSCRIBE_SECRET"):
            if name not in extra:
                env.pop(name, None)
        done = support.pgcast(db_url, "worker", "--once", env=env, check=False)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "PGCAST_PUBLIC_URL" in done.stderr and "PGCAST_UNSUBSCRIBE_SECRET" in done.stderr
    short = support.pgcast_env(db_url, **base, PGCAST_PUBLIC_URL="https://mail.example",
                               PGCAST_UNSUBSCRIBE_SECRET="too-short")
    done = support.pgcast(db_url, "worker", "--once", env=short, check=False)
    assert done.returncode == 2 and "at least 32 bytes" in done.stderr


def test_the_cli_refuses_a_test_send_past_the_hourly_cap(conn: Conn, db_url: str) -> None:
    draft = broadcasts.create(conn, "default", subject="Hi", from_address="news@example.com",
                              text="x {{ unsubscribe_url }}")
    conn.execute("INSERT INTO test_sends (account, broadcast_id, to_address) "
                 "SELECT 'default', %s, 'me@example.com' FROM generate_series(1, 50)",
                 (draft["id"],))
    done = support.pgcast(db_url, "broadcast", "test", str(draft["id"]), "--to",
                          "me@example.com", check=False)
    assert done.returncode == 1 and "at most 50 test messages" in done.stderr
    assert conn.execute("SELECT count(*) AS n FROM test_sends").fetchone() == {"n": 50}


def test_a_render_failure_fails_that_recipient_only(conn: Conn, db_url: str,
                                                     tmp_path: Path) -> None:
    conn.execute("INSERT INTO contacts (account, email, name, attributes) VALUES "
                 "('default', 'ok1@example.com', 'A', '{\"word\": \"ab\", \"times\": 2}'), "
                 "('default', 'huge@example.com', 'B', "
                 "'{\"word\": \"ab\", \"times\": 100000000}'), "
                 "('default', 'ok2@example.com', 'C', '{\"word\": \"c\", \"times\": 3}')")
    row = broadcasts.create(conn, "default", subject="Hi", from_address="news@example.com",
                            text="{{ contact.attributes.word * contact.attributes.times }} "
                                 "{{ unsubscribe_url }}")
    broadcasts.send(conn, "default", row["id"])
    outbox = tmp_path / "outbox"
    done = support.pgcast(db_url, "worker", "--once", env=file_env(db_url, outbox))
    assert done.returncode == 0
    rows = {r["email"]: r for r in conn.execute(
        "SELECT email, status, last_error FROM broadcast_recipients WHERE broadcast_id = %s",
        (row["id"],))}
    assert rows["ok1@example.com"]["status"] == rows["ok2@example.com"]["status"] == "sent"
    assert rows["huge@example.com"]["status"] == "failed"
    assert "too long" in rows["huge@example.com"]["last_error"]
    assert len(list((outbox / str(row["id"])).glob("*.eml"))) == 2
