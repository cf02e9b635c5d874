"""Provider errors never lose a recipient (invariant 9), and one global rate (invariant 8).

Real `pgcast worker` processes send through real boto3 (sesv2) to moto's SES server, with
tests.faultproxy in between answering chosen SendEmail requests with SES's own errors.
Every wait is on database state; nothing asserts how long anything took.
"""

from __future__ import annotations

import email.utils
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcast.sql import broadcasts
from tests import faultproxy, support

pytestmark = pytest.mark.acceptance

Conn = psycopg.Connection[dict[str, Any]]
SENDER = "news@example.com"
WAIT = 120.0  # seconds: generous upper bound for any wait on the database


@pytest.fixture
def proxy(ses: support.MotoServer) -> Iterator[faultproxy.FaultProxy]:
    """A fault proxy in front of this test's (emptied) SES server, no rules yet."""
    ses.verify(SENDER)
    with faultproxy.running(ses.url) as p:
        yield p


def ses_env(ses: support.MotoServer, proxy: faultproxy.FaultProxy, **extra: str) -> dict[str, str]:
    """A worker sending through the proxy; unlimited rate unless the test says otherwise."""
    return {**ses.env(), **proxy.env(), "PGCAST_PROVIDER": "ses", "PGCAST_RATE": "0", **extra}


def start_workers(procs: support.Processes, db_url: str, env: dict[str, str], n: int = 2,
                  *flags: str) -> list[Any]:
    """n worker processes with small groups and fast retries."""
    args = ("worker", "--concurrency", "2", "--group-size", "5", "--batch-size", "20",
            "--retry-base", "0.05", *flags)
    return [procs.start(db_url, *args, **env) for _ in range(n)]


def listening(conn: Conn) -> int:
    """Worker processes past start-up (configure_rate done): their LISTEN sessions."""
    # the control listener's session (the sweeper LISTENs on another channel)
    row = conn.execute("SELECT count(*) AS n FROM pg_stat_activity "
                       "WHERE query = 'LISTEN pgcast_control' AND datname = current_database()"
                       ).fetchone()
    return int(row["n"]) if row else 0


def status_is(conn: Conn, bid: uuid.UUID, *wanted: str) -> bool:
    return support.progress(conn, bid)["status"] in wanted


def settled(conn: Conn, bid: uuid.UUID) -> dict[str, int] | None:
    """The status counts once nothing is claimed or in a worker's hands."""
    counts = support.status_counts(conn, bid)
    return None if counts.get("claimed") or counts.get("sending") else counts


def delivered(ses: support.MotoServer) -> Counter[str]:
    """How many messages SES accepted per recipient address."""
    return Counter(email.utils.parseaddr(to)[1] for m in ses.messages()
                   for to in m["destinations"]["ToAddresses"])


def emails(conn: Conn, bid: uuid.UUID, status: str | None = None) -> list[str]:
    rows = conn.execute("SELECT email FROM broadcast_recipients WHERE broadcast_id = %s "
                        "AND (%s::text IS NULL OR status = %s)", (bid, status, status)).fetchall()
    return sorted(r["email"] for r in rows)


def exit_stats(procs: support.Processes, proc: Any) -> dict[str, int]:
    """Stop a worker and read the counts it prints on exit."""
    assert procs.stop(proc) == 0, procs.log(proc)
    last = [line for line in procs.log(proc).splitlines() if line.startswith("{")][-1]
    return dict(json.loads(last))


def test_throttled_sends_are_retried_until_each_recipient_got_exactly_one(
        db_url: str, conn: Conn, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy) -> None:
    proxy.set_rules(faultproxy.throttled(every=5))  # 20% of SendEmail calls: 429
    support.seed_contacts(conn, 60)
    bid = support.new_broadcast(conn, from_address=SENDER)
    # a real rate, so every throttle also drains the global bucket
    workers = start_workers(procs, db_url, ses_env(ses, proxy, PGCAST_RATE="200",
                                                   PGCAST_BURST="10"))
    support.wait_for(lambda: status_is(conn, bid, "sent", "failed", "paused"), timeout=WAIT,
                     what="the broadcast to finish")
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["sent"], p["failed"], p["unknown"]) == ("sent", 60, 0, 0)
    counts = delivered(ses)
    assert sorted(counts) == emails(conn, bid) and set(counts.values()) == {1}
    assert proxy.injected >= 60 // 5
    # a throttle is not an attempt: every recipient took exactly one counted attempt
    attempts = conn.execute("SELECT DISTINCT attempts FROM broadcast_recipients "
                            "WHERE broadcast_id = %s", (bid,)).fetchall()
    assert [r["attempts"] for r in attempts] == [1]
    # every 429 reached pgcast (boto3 retried none of them behind its back)
    retried = sum(exit_stats(procs, w)["retried"] for w in workers)
    assert retried >= proxy.injected
    assert proxy.forwarded_sends == 60  # each recipient reached SES once


def test_message_rejected_fails_that_recipient_with_the_reason(
        db_url: str, conn: Conn, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy) -> None:
    bad = ["user3@example.com", "user17@example.com"]
    proxy.set_rules(*(faultproxy.rejected(addr) for addr in bad))
    support.seed_contacts(conn, 25)
    bid = support.new_broadcast(conn, from_address=SENDER)
    start_workers(procs, db_url, ses_env(ses, proxy))
    support.wait_for(lambda: status_is(conn, bid, "sent", "failed", "paused"), timeout=WAIT,
                     what="the broadcast to finish")
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["sent"], p["failed"]) == ("sent", 23, 2)
    rows = conn.execute("SELECT email, last_error, attempts FROM broadcast_recipients "
                        "WHERE broadcast_id = %s AND status = 'failed' ORDER BY email",
                        (bid,)).fetchall()
    assert [r["email"] for r in rows] == sorted(bad)
    for r in rows:
        assert r["last_error"].startswith("MessageRejected: Email address is on the suppression")
        assert r["attempts"] == 1  # permanent: never retried
    assert sorted(delivered(ses)) == emails(conn, bid, "sent")


@pytest.mark.parametrize("resume_with", ["sql", "cli"])
def test_sending_paused_pauses_the_broadcast_and_resume_delivers_the_rest(
        db_url: str, conn: Conn, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy, resume_with: str) -> None:
    proxy.set_rules(faultproxy.sending_paused(skip=7))  # SES pauses the account after 7
    support.seed_contacts(conn, 40)
    bid = support.new_broadcast(conn, from_address=SENDER)
    start_workers(procs, db_url, ses_env(ses, proxy))
    support.wait_for(lambda: status_is(conn, bid, "paused"), timeout=WAIT, what="the pause")
    counts = support.wait_for(lambda: settled(conn, bid), timeout=WAIT,
                              what="the workers to let go of the rows")
    assert counts == {"sent": 7, "pending": 33}  # nobody failed, nobody was burnt through
    p = support.assert_counters_true(conn, bid)
    assert p["paused_reason"] == "sending_paused"
    audit = broadcasts.get(conn, "default", bid)["audit_log"][-1]
    assert audit["action"] == "pause" and audit["details"]["reason"] == "sending_paused"
    assert "SendingPausedException" in audit["details"]["error"]
    untouched = conn.execute("SELECT count(*) AS n FROM broadcast_recipients WHERE "
                             "broadcast_id = %s AND status = 'pending' AND attempts = 0",
                             (bid,)).fetchone()
    assert untouched is not None and untouched["n"] == 33
    assert sum(delivered(ses).values()) == 7

    proxy.set_rules()  # the operator fixed the account
    if resume_with == "sql":
        assert broadcasts.resume(conn, "default", bid)["success"]
    else:
        support.pgcast(db_url, "broadcast", "resume", str(bid))
    support.wait_for(lambda: status_is(conn, bid, "sent"), timeout=WAIT, what="delivery")
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["failed"], p["unknown"]) == (40, 0, 0)
    counts_by_address = delivered(ses)
    assert sorted(counts_by_address) == emails(conn, bid) and set(counts_by_address.values()) == {1}


def test_daily_quota_pauses_with_reason_daily_quota(
        db_url: str, conn: Conn, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy) -> None:
    # a 429 like a throttle, but the daily quota: retrying until midnight is not a plan
    proxy.set_rules(faultproxy.daily_quota(skip=3))
    support.seed_contacts(conn, 30)
    bid = support.new_broadcast(conn, from_address=SENDER)
    start_workers(procs, db_url, ses_env(ses, proxy))
    support.wait_for(lambda: status_is(conn, bid, "paused"), timeout=WAIT, what="the pause")
    counts = support.wait_for(lambda: settled(conn, bid), timeout=WAIT,
                              what="the workers to let go of the rows")
    assert counts == {"sent": 3, "pending": 27}
    p = support.assert_counters_true(conn, bid)
    assert p["paused_reason"] == "daily_quota"


def test_circuit_breaker_pauses_a_broadcast_that_keeps_failing(
        db_url: str, conn: Conn, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy) -> None:
    proxy.set_rules(faultproxy.server_error(503))
    support.seed_contacts(conn, 40)
    bid = support.new_broadcast(conn, from_address=SENDER)
    start_workers(procs, db_url, ses_env(ses, proxy), 2, "--breaker", "8",
                  "--max-retries", "1000")
    support.wait_for(lambda: status_is(conn, bid, "paused"), timeout=WAIT, what="the breaker")
    counts = support.wait_for(lambda: settled(conn, bid), timeout=WAIT,
                              what="the workers to let go of the rows")
    assert counts == {"pending": 40}  # transient: retried later, never failed
    p = support.assert_counters_true(conn, bid)
    assert p["paused_reason"] == "error_rate"
    assert sum(delivered(ses).values()) == 0


def rate_of(conn: Conn) -> tuple[float, float]:
    row = conn.execute("SELECT rate, burst FROM rate_limits WHERE name = 'global'").fetchone()
    assert row is not None
    return float(row["rate"]), float(row["burst"])


def sent_count(conn: Conn, bid: uuid.UUID) -> int:
    return int(support.progress(conn, bid)["sent"])


@pytest.mark.parametrize("change_with", ["cli", "sql"])
def test_a_rate_change_reaches_running_workers_without_a_restart(
        db_url: str, conn: Conn, procs: support.Processes, tmp_path: Path,
        change_with: str) -> None:
    support.seed_contacts(conn, 300)
    env = {"PGCAST_PROVIDER": "null", "PGCAST_RATE": "0.5", "PGCAST_BURST": "1"}
    start_workers(procs, db_url, env, 2)
    # both workers applied PGCAST_RATE at start: a later start would undo the change below
    support.wait_for(lambda: listening(conn) == 2, timeout=WAIT, what="the workers")
    assert rate_of(conn) == (0.5, 1.0)
    bid = support.new_broadcast(conn)
    support.wait_for(lambda: sent_count(conn, bid) >= 1, timeout=WAIT, what="the first send")
    # at 0.5/s the 300 recipients would take 10 minutes: only the new rate finishes them
    if change_with == "cli":
        support.pgcast(db_url, "rate", "set", "1000", "--burst", "100")
        shown = json.loads(support.pgcast(db_url, "rate", "show").stdout)
        assert (shown["rate"], shown["burst"]) == (1000.0, 100.0)
    else:
        conn.execute("UPDATE rate_limits SET rate = 1000, burst = 100 WHERE name = 'global'")
    support.wait_for(lambda: status_is(conn, bid, "sent"), timeout=WAIT, what="the new rate")
    assert support.assert_counters_true(conn, bid)["sent"] == 300
    assert rate_of(conn) == (1000.0, 100.0)  # no worker put its start-up rate back


def test_ses_worker_without_pgcast_rate_uses_85_percent_of_max_send_rate(
        db_url: str, conn: Conn, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy) -> None:
    env = {**ses.env(), **proxy.env(), "PGCAST_PROVIDER": "ses"}
    conn.execute("UPDATE rate_limits SET rate = 0 WHERE name = 'global'")
    procs.start(db_url, "worker", "--concurrency", "1", **env)
    # moto: sesv2 get_account is missing, v1 get_send_quota says MaxSendRate 1.0
    support.wait_for(lambda: rate_of(conn) == (0.85, 2.0), timeout=WAIT, what="the SES rate")


def test_ses_limit_does_not_override_a_lower_operator_rate_on_restart(
        db_url: str, conn: Conn, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy) -> None:
    support.pgcast(db_url, "rate", "set", "0.25")
    env = {**ses.env(), **proxy.env(), "PGCAST_PROVIDER": "ses"}
    worker = procs.start(db_url, "worker", "--concurrency", "1", **env)
    support.wait_for(lambda: listening(conn) == 1, timeout=WAIT, what="the worker")
    assert worker.poll() is None
    assert rate_of(conn) == (0.25, 2.0)
