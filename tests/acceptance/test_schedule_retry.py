"""Scheduled sends and retries with real `pgcast worker` processes (issue 15).

Starts are made by the sweeper of whichever worker runs it; retries go through the same
handoff fence as the first pass, to moto's SES server behind tests.faultproxy. Every wait is
on database state.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcast.sql import broadcasts, schedule
from tests import faultproxy, support
from tests.acceptance import test_provider_faults as faults

pytestmark = pytest.mark.acceptance

Conn = psycopg.Connection[dict[str, Any]]
WAIT = 120.0  # seconds: generous upper bound for any wait on the database


@pytest.fixture
def proxy(ses: support.MotoServer) -> Iterator[faultproxy.FaultProxy]:
    """A fault proxy in front of this test's (emptied) SES server, no rules yet."""
    ses.verify(faults.SENDER)
    with faultproxy.running(ses.url) as p:
        yield p


def iso(delta_seconds: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delta_seconds)).isoformat()


def create(db_url: str, tmp_path: Path, subject: str) -> uuid.UUID:
    body = tmp_path / "body.txt"
    body.write_text("Hello there")
    done = support.pgcast(db_url, "broadcast", "create", "--subject", subject,
                          "--from", faults.SENDER, "--text", str(body))
    return uuid.UUID(done.stdout.strip())


def cli_json(db_url: str, *args: str, check: bool = True) -> dict[str, Any]:
    done = support.pgcast(db_url, *args, check=check)
    return dict(json.loads(done.stdout))


def audit(conn: Conn, bid: uuid.UUID) -> list[dict[str, Any]]:
    row = conn.execute("SELECT audit_log FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert row is not None
    return list(row["audit_log"])


def test_three_workers_start_a_scheduled_broadcast_once_and_never_a_cancelled_one(
        db_url: str, conn: Conn, procs: support.Processes, tmp_path: Path) -> None:
    support.seed_contacts(conn, 60)
    bid = create(db_url, tmp_path, "scheduled")
    dropped = create(db_url, tmp_path, "cancelled before its time")
    later = create(db_url, tmp_path, "due just after the cancelled one")
    for _ in range(3):
        procs.start(db_url, "worker", "--concurrency", "2", "--sweep-every", "1",
                    PGCAST_PROVIDER="null")
    support.wait_for(lambda: faults.listening(conn) == 3, timeout=WAIT, what="three workers")
    # in this process, so the cancel surely comes before the time
    schedule.schedule(conn, "default", dropped, iso(3))
    cancel = broadcasts.cancel(conn, "default", dropped)
    assert (cancel["success"], cancel["status"]) == (True, "cancelled")
    schedule.schedule(conn, "default", later, iso(3.5))
    result = cli_json(db_url, "broadcast", "schedule", str(bid), "--at", iso(2))
    assert (result["success"], result["status"]) == (True, "scheduled")
    far = create(db_url, tmp_path, "in an hour")
    at_far = schedule.schedule(conn, "default", far, iso(3600))["scheduled_at"]
    listed = json.loads(support.pgcast(db_url, "broadcast", "list").stdout)  # not a terminal
    [entry] = [x for x in listed if x["id"] == str(far)]
    assert entry["status"] == "scheduled"
    assert dt.datetime.fromisoformat(entry["scheduled_at"]) == at_far
    # the sweepers start due broadcasts in time order: once `later` has started, every sweep
    # after the cancelled one's time has passed it by
    for b in (bid, later):
        support.wait_for(lambda b=b: faults.status_is(conn, b, "sent"), timeout=WAIT,
                         what="the scheduled broadcasts sent")
    p = support.assert_counters_true(conn, bid)
    assert (p["total"], p["sent"]) == (60, 60)
    starts = [e for e in audit(conn, bid) if e["to"] == "sending"]
    assert len(starts) == 1, starts
    assert (starts[0]["action"], starts[0]["from"]) == ("send", "scheduled")
    assert starts[0]["details"]["recipients"] == 60
    assert starts[0]["details"]["lateness_seconds"] >= 0
    partitions = conn.execute("SELECT count(*) AS n FROM pg_inherits "
                              "WHERE inhparent = 'broadcast_recipients'::regclass").fetchone()
    assert partitions is not None and partitions["n"] == 2  # bid and later: one snapshot each
    assert support.progress(conn, far)["status"] == "scheduled"
    gone = support.progress(conn, dropped)
    assert (gone["status"], gone["total"], gone["started_at"]) == ("cancelled", 0, None)
    assert support.status_counts(conn, dropped) == {}
    assert [e["action"] for e in audit(conn, dropped)] == ["create", "schedule", "cancel"]


def test_worker_once_starts_a_due_broadcast(db_url: str, conn: Conn, procs: support.Processes,
                                            tmp_path: Path) -> None:
    support.seed_contacts(conn, 10)
    bid = create(db_url, tmp_path, "due")
    cli_json(db_url, "broadcast", "schedule", str(bid), "--at", iso(-1))
    env = support.pgcast_env(db_url, PGCAST_PROVIDER="null")
    support.pgcast(db_url, "worker", "--once", env=env)
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["sent"]) == ("sent", 10)


def test_retry_reaches_the_rejected_recipients_once_and_unknown_ones_only_when_asked(
        db_url: str, conn: Conn, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy, tmp_path: Path) -> None:
    support.seed_contacts(conn, 40)
    rejected = ["user3@example.com", "user17@example.com", "user29@example.com"]
    lost = "user8@example.com"
    proxy.set_rules(*(faultproxy.rejected(a) for a in rejected), faultproxy.no_answer(lost))
    bid = create(db_url, tmp_path, "retry me")
    faults.start_workers(procs, db_url, faults.ses_env(ses, proxy), 2)
    cli_json(db_url, "broadcast", "send", str(bid))
    support.wait_for(lambda: faults.status_is(conn, bid, "sent"), timeout=WAIT,
                     what="the first pass finished")
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["failed"], p["unknown"]) == (36, 3, 1)
    assert faults.emails(conn, bid, "failed") == sorted(rejected)
    assert faults.emails(conn, bid, "unknown") == [lost]
    # the fault is gone; one of the rejected contacts unsubscribed meanwhile
    proxy.set_rules()
    support.pgcast(db_url, "contacts", "unsubscribe", rejected[0])
    result = cli_json(db_url, "broadcast", "retry", str(bid))
    assert result == {"success": True, "status": "sending", "requeued": 3,
                      "message": "Retrying 3 recipients"}
    support.wait_for(lambda: faults.status_is(conn, bid, "sent"), timeout=WAIT,
                     what="the retry finished")
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["failed"], p["skipped"], p["unknown"]) == (38, 0, 1, 1)
    assert faults.emails(conn, bid, "skipped") == [rejected[0]]
    # the unknown row is left alone unless asked
    again = support.pgcast(db_url, "broadcast", "retry", str(bid), check=False)
    assert again.returncode == 1
    assert json.loads(again.stdout) == {
        "success": False, "status": "sent", "requeued": 0,
        "message": "Broadcast is sent with no failed recipients to retry"}
    # handed off moments ago: its call may still be answered, so it is left, and said so
    doubt = support.pgcast(db_url, "broadcast", "retry", str(bid), "--include-unknown",
                           check=False)
    assert doubt.returncode == 1
    assert json.loads(doubt.stdout) | {"message": ""} == {
        "success": False, "status": "sent", "requeued": 0, "in_doubt": 1, "message": ""}
    assert "handed off too recently" in json.loads(doubt.stdout)["message"]
    conn.execute("UPDATE broadcast_recipients SET handed_at = handed_at - interval '1 hour' "
                 "WHERE broadcast_id = %s AND status = 'unknown'", (bid,))
    result = cli_json(db_url, "broadcast", "retry", str(bid), "--include-unknown")
    assert (result["success"], result["requeued"], result["in_doubt"]) == (True, 1, 0)
    support.wait_for(lambda: faults.status_is(conn, bid, "sent"), timeout=WAIT,
                     what="the second retry finished")
    p = support.assert_counters_true(conn, bid)
    assert (p["total"], p["sent"], p["skipped"], p["failed"], p["unknown"]) == (40, 39, 1, 0, 0)
    got = faults.delivered(ses)
    everyone = {f"user{i}@example.com" for i in range(40)}
    assert {a: got[a] for a in everyone - {rejected[0]}} == {
        a: 1 for a in everyone - {rejected[0]}}
    assert got[rejected[0]] == 0
    retries = [e["details"] for e in audit(conn, bid) if e["action"] == "retry"]
    assert [(d["requeued"], d["include_unknown"], d["via"]) for d in retries] == [
        (3, False, "cli"), (1, True, "cli")]


def test_cli_schedule_unschedule_copy_and_bad_input(db_url: str, conn: Conn,
                                                     tmp_path: Path) -> None:
    bid = create(db_url, tmp_path, "cli")
    naive = support.pgcast(db_url, "broadcast", "schedule", str(bid), "--at",
                           "2026-12-24T09:00:00", check=False)
    assert naive.returncode == 2 and naive.stdout == ""
    assert naive.stderr.startswith("pgcast: error: --at has no offset")
    assert support.progress(conn, bid)["status"] == "draft"
    result = cli_json(db_url, "broadcast", "schedule", str(bid), "--at", iso(3600),
                      "--not-after", iso(7200))
    assert result["status"] == "scheduled" and result["not_after"] is not None
    again = support.pgcast(db_url, "broadcast", "schedule", str(bid), "--at", iso(60),
                           check=False)
    assert again.returncode == 1 and json.loads(again.stdout)["status"] == "scheduled"
    assert cli_json(db_url, "broadcast", "unschedule", str(bid))["status"] == "draft"
    copy = support.pgcast(db_url, "broadcast", "copy", str(bid)).stdout.strip()
    new = conn.execute("SELECT status, subject, audit_log -> 0 -> 'details' AS d "
                       "FROM broadcasts WHERE id = %s", (copy,)).fetchone()
    assert new is not None and (new["status"], new["subject"]) == ("draft", "cli")
    assert new["d"]["copied_from"] == str(bid) and new["d"]["via"] == "cli"
    entries = [(e["action"], e["details"].get("via")) for e in audit(conn, bid)]
    assert entries == [("create", "cli"), ("schedule", "cli"), ("unschedule", "cli")]
