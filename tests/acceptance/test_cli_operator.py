"""The commands an operator reaches for, through the real `pgcast` executable."""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from pgcast.api import progress as api_progress
from pgcast.sql.queries import QUERIES
from tests import support
from tests.acceptance.test_cli_import import PGCAST, run

Conn = psycopg.Connection[dict[str, Any]]


def on_terminal(db_url: str, *args: str) -> str:
    """Run pgcast with its stdout on a pseudo-terminal; return what it printed there."""
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([PGCAST, *args], env=support.pgcast_env(db_url), stdout=follower,
                              stderr=subprocess.PIPE, text=True, timeout=120, check=True)
        assert done.returncode == 0
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode().replace("\r\n", "\n")
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)


def test_contacts_list_and_count_by_status_and_tag(conn: Conn, db_url: str) -> None:
    support.seed_contacts(conn, 5, tag="vip")
    support.seed_contacts(conn, 3, start=10)
    conn.execute("UPDATE contacts SET unsubscribed_at = now() WHERE email = 'user1@example.com'")
    conn.execute("UPDATE contacts SET suppressed_at = now(), suppressed_reason = 'bounce' "
                 "WHERE email = 'user2@example.com'")
    counted = json.loads(run(db_url, "contacts", "count").stdout)
    assert counted == {"total": 8, "subscribed": 6, "unsubscribed": 1, "suppressed": 1,
                       "unconfirmed": 0}
    assert json.loads(run(db_url, "contacts", "count", "--tag", "vip").stdout)["total"] == 5
    listed = json.loads(run(db_url, "contacts", "list", "--status", "subscribed",
                            "--tag", "vip").stdout)
    assert [c["email"] for c in listed] == ["user0@example.com", "user3@example.com",
                                            "user4@example.com"]
    assert {c["status"] for c in listed} == {"subscribed"}
    gone = json.loads(run(db_url, "contacts", "list", "--status", "suppressed").stdout)
    assert [(c["email"], c["suppressed_reason"]) for c in gone] == [
        ("user2@example.com", "bounce")]
    # paging: --limit prints a cursor on stderr, --after continues from it
    first = run(db_url, "contacts", "list", "--limit", "5")
    assert len(json.loads(first.stdout)) == 5
    cursor = first.stderr.strip().split("--after ")[1]
    rest = json.loads(run(db_url, "contacts", "list", "--after", cursor).stdout)
    assert len(rest) == 3 and rest[0]["email"] > cursor


def test_listings_are_tables_on_a_terminal_and_json_otherwise(conn: Conn, db_url: str) -> None:
    support.seed_contacts(conn, 2)
    table = on_terminal(db_url, "contacts", "list").splitlines()
    assert table[0].split() == ["EMAIL", "NAME", "TAGS", "STATUS", "CREATED_AT"]
    assert table[1].startswith("user0@example.com") and len(table) == 3
    forced = json.loads(on_terminal(db_url, "contacts", "list", "--json"))
    assert [c["email"] for c in forced] == ["user0@example.com", "user1@example.com"]
    bid = support.new_broadcast(conn, send=False)
    table = on_terminal(db_url, "broadcast", "list").splitlines()
    assert table[0].split() == ["ID", "STATUS", "SENT", "TOTAL", "CREATED_AT", "SCHEDULED_AT",
                                 "SUBJECT"]
    assert table[1].startswith(str(bid))


def test_json_keeps_non_ascii_and_uses_iso_8601_times(conn: Conn, db_url: str,
                                                      tmp_path: Path) -> None:
    body = tmp_path / "b.txt"
    body.write_text("Hej")
    run(db_url, "broadcast", "create", "--subject", "Zoë’s news 🎉", "--from",
        "Zoë <z@example.com>", "--text", str(body))
    out = run(db_url, "broadcast", "list").stdout
    assert "Zoë’s news 🎉" in out and "\\u" not in out
    [row] = json.loads(out)
    assert dt.datetime.fromisoformat(row["created_at"]).tzinfo is not None
    assert "T" in row["created_at"]


def test_ids_by_unique_prefix_of_8_or_more(conn: Conn, db_url: str) -> None:
    support.seed_contacts(conn, 3)
    bid = support.new_broadcast(conn, send=False)
    sent = json.loads(run(db_url, "broadcast", "send", str(bid)[:8]).stdout)
    assert sent["queued"] == 3
    status = json.loads(run(db_url, "broadcast", "status", str(bid)[:13]).stdout)
    assert status["total"] == 3
    for bad in (str(bid)[:7], "zzzzzzzz", "00000000"):
        done = run(db_url, "broadcast", "status", bad)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done
    # another account's broadcast is not found by its prefix either
    done = run(db_url, "broadcast", "status", str(bid)[:8], "--account", "other")
    assert done.returncode == 2


def test_broadcast_status_has_the_api_progress_keys(conn: Conn, db_url: str) -> None:
    support.seed_contacts(conn, 2)
    bid = support.new_broadcast(conn)
    status = json.loads(run(db_url, "broadcast", "status", str(bid)).stdout)
    row = conn.execute(QUERIES["api_progress"], {"account": "default", "id": bid}).fetchone()
    assert row is not None
    assert list(status) == list(api_progress.progress_json(row))
    assert {"rate", "eta_seconds"} <= set(status)
    assert status["eta_seconds"] is None or isinstance(status["eta_seconds"], int)


def test_broadcast_recipients_by_status(conn: Conn, db_url: str) -> None:
    support.seed_contacts(conn, 4)
    bid = support.new_broadcast(conn)
    conn.execute("UPDATE broadcast_recipients SET status = 'failed', worker = 'w', attempts = 1, "
                 "last_error = 'mailbox full' WHERE email = 'user2@example.com'")
    every = json.loads(run(db_url, "broadcast", "recipients", str(bid)).stdout)
    assert [r["email"] for r in every] == [f"user{i}@example.com" for i in range(4)]
    failed = json.loads(run(db_url, "broadcast", "recipients", str(bid)[:8], "--status",
                            "failed").stdout)
    assert [(r["email"], r["last_error"]) for r in failed] == [
        ("user2@example.com", "mailbox full")]
    page = run(db_url, "broadcast", "recipients", str(bid), "--limit", "3")
    assert len(json.loads(page.stdout)) == 3
    after = page.stderr.strip().split("--after ")[1]
    assert len(json.loads(run(db_url, "broadcast", "recipients", str(bid), "--after",
                              after).stdout)) == 1
    done = run(db_url, "broadcast", "recipients", str(bid), "--account", "other")
    assert done.returncode == 2


def test_resubscribe_is_recorded_with_who_did_it(conn: Conn, db_url: str) -> None:
    support.seed_contacts(conn, 1)
    run(db_url, "contacts", "unsubscribe", "user0@example.com")
    done = run(db_url, "contacts", "resubscribe", "USER0@example.com", "--actor", "ops-kim")
    assert json.loads(done.stdout)["resubscribed"] is True
    again = json.loads(run(db_url, "contacts", "resubscribe", "user0@example.com").stdout)
    assert again["resubscribed"] is False
    rows = conn.execute("SELECT action, source, actor FROM contact_events ORDER BY id"
                        ).fetchall()
    assert [(r["action"], r["source"]) for r in rows] == [("unsubscribe", "cli"),
                                                          ("resubscribe", "cli")]
    assert rows[1]["actor"]["via"] == "cli" and rows[1]["actor"]["user"] == "ops-kim"
    assert rows[1]["actor"]["host"]
    assert conn.execute("SELECT unsubscribed_at FROM contacts").fetchone() == {
        "unsubscribed_at": None}
    assert run(db_url, "contacts", "resubscribe", "nobody@example.com").returncode == 2


def test_cli_control_actions_record_the_os_user_in_the_audit_log(conn: Conn,
                                                                  db_url: str) -> None:
    support.seed_contacts(conn, 1)
    body = Path(tempfile.mkdtemp()) / "body.txt"
    body.write_text("Hello {{ unsubscribe_url }}")
    made = run(db_url, "broadcast", "create", "--subject", "S", "--from", "news@example.com",
               "--text", str(body), "--actor", "ops-lee")
    bid = made.stdout.strip()
    run(db_url, "broadcast", "send", str(bid))
    run(db_url, "broadcast", "pause", str(bid))
    run(db_url, "broadcast", "resume", str(bid),
        env=support.pgcast_env(db_url, PGCAST_ACTOR="night-shift"))
    run(db_url, "broadcast", "cancel", str(bid), "--actor", "ops-kim")
    log = conn.execute("SELECT audit_log FROM broadcasts").fetchone()["audit_log"]  # type: ignore[index]
    by_action = {e["action"]: e.get("details") or {} for e in log}
    assert by_action["create"] == {"via": "cli", "user": "ops-lee",
                                   "host": by_action["create"]["host"]}
    assert by_action["send"]["via"] == "cli" and by_action["send"]["host"]
    assert by_action["pause"]["via"] == "cli" and by_action["pause"]["user"]
    assert by_action["resume"]["user"] == "night-shift"
    assert by_action["cancel"]["user"] == "ops-kim"


def test_version_and_bad_log_level(db_url: str) -> None:
    done = run(db_url, "--version")
    assert done.returncode == 0 and done.stdout.startswith("pgcast ")
    for command in (["worker", "--once"], ["api"]):
        env = support.pgcast_env(db_url, PGCAST_LOG_LEVEL="verbose")
        done = run(db_url, *command, env=env)
        assert done.returncode == 2, done
        assert done.stderr.strip().splitlines() == [
            "pgcast: error: PGCAST_LOG_LEVEL: 'verbose' is not a log level; use one of debug, "
            "info, warning, error, critical (default info)"]
    for var, value, command in (("PGCAST_LEASE_SECONDS", "soon", "worker"),
                                ("PGCAST_BREAKER", "-1", "worker"),
                                ("PGCAST_SWEEP_SECONDS", "90", "worker"),
                                ("PGCAST_API_PORT", "http", "api")):
        done = run(db_url, command, env=support.pgcast_env(db_url, **{var: value}))
        assert done.returncode == 2 and var in done.stderr, done
        assert len(done.stderr.strip().splitlines()) == 1


def test_default_home_is_the_xdg_data_dir_and_an_existing_dot_pgcast_is_kept(
        tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGCAST_HOME")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([PGCAST, "db", "stop"], env=env, cwd=work, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "not running"
    assert done.stderr.strip() == f"pgcast: data in {tmp_path / 'xdg' / 'pgcast' / 'pgdata'}"
    (work / ".pgcast" / "pgdata").mkdir(parents=True)
    said = []
    for _ in range(2):
        done = subprocess.run([PGCAST, "db", "stop"], env=env, cwd=work, capture_output=True,
                              text=True, timeout=60)
        said.append(done.stderr.strip().splitlines())
    assert said[0][0].startswith(f"pgcast: using the existing {work / '.pgcast'}")
    assert said[0][1:] == said[1] == [f"pgcast: data in {work / '.pgcast' / 'pgdata'}"]


def test_worker_logs_what_an_operator_needs_at_info_and_sweeps_only_at_debug(
        conn: Conn, db_url: str, procs: support.Processes) -> None:
    support.seed_contacts(conn, 3)
    bid = support.new_broadcast(conn)
    proc = procs.start(db_url, "worker", "--sweep-every", "1", PGCAST_PROVIDER="null",
                       PGCAST_LOG_LEVEL="INFO")
    support.wait_for(lambda: support.progress(conn, bid)["status"] == "sent")
    # sweeps deferred two periods apart, and none left to run: the sweeper ran at least twice
    # while the worker logged at INFO (procrastinate keeps only the latest defer's row)
    def last_defer() -> Any:
        row = conn.execute("SELECT max(defer_timestamp) AS t FROM procrastinate_periodic_defers "
                           "WHERE NOT EXISTS (SELECT 1 FROM procrastinate_jobs "
                           "WHERE status IN ('todo', 'doing'))").fetchone()
        return row["t"] if row else None

    support.wait_for(last_defer)
    first = last_defer()
    support.wait_for(lambda: (last_defer() or 0) >= first + 2)
    assert procs.stop(proc) == 0
    log = procs.log(proc)
    assert "started (provider null" in log
    assert f"working on broadcast {bid}" in log
    assert (f"broadcast {bid} finished sent: total 3, sent 3, failed 0, skipped 0, unknown 0, "
            "cancelled 0") in log
    assert "procrastinate" not in log and "sweep ran" not in log, log


def test_watch_of_a_paused_broadcast_shows_no_eta_and_ends_with_the_api_shape(
        conn: Conn, db_url: str) -> None:
    support.seed_contacts(conn, 5)
    bid = support.new_broadcast(conn)
    conn.execute("UPDATE broadcasts SET started_at = now() - interval '10 seconds'")
    run(db_url, "broadcast", "pause", str(bid))
    done = run(db_url, "broadcast", "status", str(bid)[:8], "--watch")
    bar, last = done.stdout.strip().splitlines()
    assert bar.endswith("ETA -  paused"), bar
    final = json.loads(last)
    assert (final["status"], final["eta_seconds"]) == ("paused", None)


def test_db_url_prints_the_url_alone_on_stdout_and_where_the_data_lives_on_stderr(
        tmp_path: Path) -> None:
    from pgcast.sql import embedded

    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PGCAST_HOME"] = str(tmp_path / "home")
    try:
        done = subprocess.run([PGCAST, "db", "url"], env=env, capture_output=True, text=True,
                              timeout=120, check=True)
        assert done.stdout.count("\n") == 1 and done.stdout.startswith("postgresql://")
        assert done.stderr.strip() == f"pgcast: data in {tmp_path / 'home' / 'pgdata'}"
    finally:
        embedded.discard(tmp_path / "home")


def test_a_send_that_matches_nobody_is_refused_naming_the_segment_unless_allowed(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    support.seed_contacts(conn, 2, tag="vip")
    body = tmp_path / "b.txt"
    body.write_text("Hi")
    bid = run(db_url, "broadcast", "create", "--subject", "S", "--from", "a@example.com",
              "--text", str(body), "--tag", "vpi").stdout.strip()
    done = run(db_url, "broadcast", "send", bid)
    assert done.returncode == 1, done
    refused = json.loads(done.stdout)
    assert (refused["success"], refused["status"]) == (False, "empty")
    assert "'vpi'" in refused["message"] and "allow_empty" in refused["message"]
    assert conn.execute("SELECT status FROM broadcasts").fetchone() == {"status": "draft"}
    done = run(db_url, "broadcast", "send", bid, "--allow-empty")
    assert done.returncode == 0, done
    sent = json.loads(done.stdout)
    assert (sent["success"], sent["queued"]) == (True, 0)
    assert conn.execute("SELECT status FROM broadcasts").fetchone() == {"status": "sent"}
