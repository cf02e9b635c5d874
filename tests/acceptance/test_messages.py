"""Transactional messages with real processes (issue 26): the CLI, and exactly-once under
kill -9 (the broadcast chaos test's pattern: real workers killed, asserted on the rows and on
what the SES server received)."""

from __future__ import annotations

import collections
import json
import random
import signal
from pathlib import Path
from typing import Any

import psycopg

from tests import support
from tests.acceptance import test_chaos as chaos

Conn = psycopg.Connection[dict[str, Any]]
N = 800  # messages
SENDER = "shop@example.com"
MOST = 10  # --max-in-flight of the workers


def counts(conn: Conn) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) AS n FROM messages GROUP BY status").fetchall()
    return collections.Counter({r["status"]: r["n"] for r in rows})


def test_cli_send_worker_once_and_status(conn: Conn, db_url: str, tmp_path: Path) -> None:
    body = tmp_path / "body.txt"
    body.write_text("Your code is 123456\n")
    args = ("message", "send", "--to", "ann@example.com", "--subject", "Your code",
            "--text", str(body), "--from", f"Shop <{SENDER}>", "--key", "code-1")
    first = json.loads(support.pgcast(db_url, *args).stdout)
    again = json.loads(support.pgcast(db_url, *args).stdout)
    assert first["status"] == "queued" and first["created"] is True
    assert again == {**first, "created": False}
    outbox = tmp_path / "outbox"
    support.pgcast(db_url, "worker", "--once", env=support.pgcast_env(
        db_url, PGCAST_PROVIDER="file", PGCAST_OUTBOX_DIR=str(outbox)))
    status = json.loads(support.pgcast(db_url, "message", "status", first["id"]).stdout)
    assert status["status"] == "sent" and status["attempts"] == 1
    eml = (outbox / "messages" / f"{first['id']}.eml").read_text()
    assert "Your code is 123456" in eml and "Subject: Your code" in eml
    bad = support.pgcast(db_url, "message", "send", "--to", "nope", "--subject", "x", "--text",
                         str(body), "--from", SENDER, check=False)
    assert bad.returncode == 2 and "--to" in bad.stderr
    share = json.loads(support.pgcast(db_url, "rate", "messages-share", "0.25").stdout)
    assert share == {"name": "global", "messages_share": 0.25}
    assert json.loads(support.pgcast(db_url, "rate", "show").stdout)["messages_share"] == 0.25
    for bad in ("1.5", "0"):  # 0 would hold messages back for as long as broadcasts wait
        bad_share = support.pgcast(db_url, "rate", "messages-share", bad, check=False)
        assert bad_share.returncode == 2 and "more than 0 and at most 1" in bad_share.stderr


def test_kill_9_workers_repeatedly_no_message_is_sent_twice(
        conn: Conn, db_url: str, ses: support.MotoServer, procs: support.Processes) -> None:
    ses.verify(SENDER)
    # half through the SQL function, in transactions of 20; half through the CLI's statement
    for start in range(0, N, 20):
        with conn.transaction():
            for i in range(start, start + 20):
                conn.execute("SELECT pgcast_send_message('default', %s, 'Receipt', 'Thanks', "
                             "NULL, %s, %s)", (f"m{i}@example.com", SENDER, f"order-{i}"))
    env = chaos.ses_env(ses, PGCAST_RATE="150")
    # at most MOST calls in flight a process: what one kill can leave in doubt
    args = [*chaos.worker_args(), "--max-in-flight", str(MOST)]
    live = [procs.start(db_url, *args, **env) for _ in range(3)]
    rng = random.Random(7)
    kills = 0
    while kills < 6:
        done = counts(conn)["sent"]
        if done >= N - 150:
            break
        support.wait_for(lambda d=done: counts(conn)["sent"] >= d + 100, timeout=120,
                         what="100 more sent")
        victim = live.pop(rng.randrange(len(live)))
        procs.stop(victim, signal.SIGKILL)
        kills += 1
        live.append(procs.start(db_url, *args, **env))
    assert kills >= 3
    support.wait_for(lambda: counts(conn)["queued"] + counts(conn)["sending"] == 0,
                     timeout=180, every=0.2, what="every message finished")
    c = counts(conn)
    assert c["sent"] + c["unknown"] == N and c["failed"] == 0, c
    assert c["unknown"] <= kills * MOST, (c, kills)
    got = collections.Counter(to.split("<")[-1].rstrip(">") for m in ses.messages()
                              for to in m["destinations"]["ToAddresses"])
    assert max(got.values()) == 1  # nobody mailed twice
    rows = conn.execute("SELECT to_address, status FROM messages").fetchall()
    for row in rows:
        if row["status"] == "sent":
            assert got[row["to_address"]] == 1, row
        else:
            assert row["status"] == "unknown" and got[row["to_address"]] <= 1, row
    assert set(got) <= {r["to_address"] for r in rows}


def test_a_test_send_is_delivered_as_a_message(conn: Conn, db_url: str, tmp_path: Path,
                                               procs: support.Processes) -> None:
    from pgcast.sql import broadcasts

    draft = broadcasts.create(conn, "default", subject="Hi {{ contact.name }}",
                              from_address="News <news@example.com>", text="Hello")
    outbox = tmp_path / "outbox"
    procs.start(db_url, "worker", PGCAST_PROVIDER="file", PGCAST_OUTBOX_DIR=str(outbox))
    done = support.pgcast(db_url, "broadcast", "test", str(draft["id"]), "--to",
                          "me@example.com", "--timeout", "120", timeout=180)
    outcome = json.loads(done.stdout)
    test = conn.execute("SELECT id FROM test_sends").fetchone()
    assert test is not None and outcome["status"] == "sent"
    row = conn.execute("SELECT * FROM message_status").fetchone()
    assert row is not None
    # the rendered test message, on the message path: [TEST] prefix, its key names the test send
    assert row["subject"].startswith("[TEST] Hi ") and row["status"] == "sent"
    assert row["idempotency_key"] == f"pgcast-test-send-{test['id']}"
    assert row["provider_message_id"] == outcome["message_id"]
    assert row["to_address"] == "me@example.com"
    assert row["from_address"] == "News <news@example.com>"
    (eml,) = (outbox / str(draft["id"])).glob("test-*.eml")
    assert "[TEST] Hi" in eml.read_text()
