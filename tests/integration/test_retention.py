"""Retention: finished broadcasts' partitions detached into the archive, counters and audit kept."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from pgcast.sql import broadcasts, errors, retention
from pgcast.sql.queries import QUERIES
from tests import support
from tests.integration import test_dispatch as d

Conn = psycopg.Connection[dict[str, Any]]
DAY = 86400.0  # seconds


def sent_broadcast(conn: Conn, n: int = 10, *, failed: int = 2) -> uuid.UUID:
    """A broadcast of the first n contacts, drained statement by statement: n-failed sent."""
    bid = support.new_broadcast(conn)
    token, rows = d.claim(conn, bid, n)
    ids = [r["contact_id"] for r in rows]
    d.handoff(conn, bid, rows[0]["epoch"], token, ids)
    d.record(conn, bid, token, ids[failed:], "sent")
    d.record(conn, bid, token, ids[:failed], "failed")
    assert conn.execute(QUERIES["finalize"], {"id": bid}).fetchone() == {
        "ok": True, "status": "sent"}
    return bid


def age(conn: Conn, bid: uuid.UUID, days: float) -> None:
    conn.execute("UPDATE broadcasts SET finished_at = now() - make_interval(days => %s::int) "
                 "WHERE id = %s", (days, bid))


def partition_attached(conn: Conn, bid: uuid.UUID) -> bool:
    row = conn.execute("SELECT to_regclass(pgcast_partition_name_v1(%s)) AS p", (bid,)).fetchone()
    return row is not None and row["p"] is not None


def test_old_finished_broadcasts_move_to_the_archive(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    old = sent_broadcast(conn)
    recent = sent_broadcast(conn)
    live = support.new_broadcast(conn)  # still sending, however old
    cancelled = support.new_broadcast(conn)
    assert broadcasts.cancel(conn, "default", cancelled)["success"]
    for bid in (old, cancelled, live):
        age(conn, bid, 100)
    age(conn, recent, 10)
    before = {bid: support.progress(conn, bid) for bid in (old, cancelled)}
    audit_before = conn.execute("SELECT jsonb_array_length(audit_log) AS n FROM broadcasts "
                                "WHERE id = %s", (old,)).fetchone()

    dry = retention.run(conn, 90 * DAY, dry_run=True)
    assert (dry.broadcasts, dry.recipients) == (2, 20)
    assert partition_attached(conn, old)  # a dry run changes nothing

    report = retention.run(conn, 90 * DAY)
    assert sorted(report.ids) == sorted([old, cancelled]) and report.recipients == 20
    assert not partition_attached(conn, old) and not partition_attached(conn, cancelled)
    assert partition_attached(conn, recent) and partition_attached(conn, live)
    # the live table no longer has their rows; the archive has every one, as it was
    assert support.status_counts(conn, old) == {}
    archived = conn.execute(
        "SELECT status, count(*) AS n, count(provider_message_id) AS ids, count(sent_at) AS at "
        "FROM broadcast_recipients_archive WHERE broadcast_id = %s GROUP BY 1 ORDER BY 1",
        (old,)).fetchall()
    assert archived == [{"status": "failed", "n": 2, "ids": 0, "at": 0},
                        {"status": "sent", "n": 8, "ids": 8, "at": 8}]
    # the broadcast row keeps its counters, and its audit log says when it was archived
    for bid, p in before.items():
        after = support.progress(conn, bid)
        assert {k: after[k] for k in ("status", "total", "sent", "failed", "cancelled")} == {
            k: p[k] for k in ("status", "total", "sent", "failed", "cancelled")}
    row = conn.execute("SELECT archived_at, audit_log FROM broadcasts WHERE id = %s",
                       (old,)).fetchone()
    assert row is not None and row["archived_at"] is not None
    assert audit_before is not None and len(row["audit_log"]) == audit_before["n"] + 1
    assert row["audit_log"][-1]["action"] == "archive"
    assert row["audit_log"][-1]["details"] == {"recipients": 10}
    # the DBA view covers both
    every = conn.execute("SELECT broadcast_id, archived, count(*) AS n FROM "
                         "broadcast_recipients_all GROUP BY 1, 2").fetchall()
    assert {(r["broadcast_id"], r["archived"]): r["n"] for r in every} == {
        (old, True): 10, (cancelled, True): 10, (recent, False): 10, (live, False): 10}
    # nothing left to do: a second run archives nothing
    assert retention.run(conn, 90 * DAY).broadcasts == 0


def test_recipient_lookup_answers_for_live_and_archived_broadcasts(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    old, recent = sent_broadcast(conn), sent_broadcast(conn)
    age(conn, old, 100)
    retention.run(conn, 90 * DAY)

    def lookup(bid: uuid.UUID, email: str) -> list[dict[str, Any]]:
        return retention.lookup(conn, bid, email)

    for bid, archived in ((old, True), (recent, False)):
        (hit,) = lookup(bid, "USER9@example.com")  # addresses compare case-insensitively
        assert hit["status"] == "sent" and hit["archived"] is archived
        assert hit["provider_message_id"] and hit["sent_at"] is not None
        (miss,) = lookup(bid, "user0@example.com")
        assert miss["status"] == "failed" and miss["provider_message_id"] is None
        assert lookup(bid, "nobody@example.com") == []


def test_an_interrupted_run_is_finished_by_the_next(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    detached, pending = sent_broadcast(conn), sent_broadcast(conn)
    for bid in (detached, pending):
        age(conn, bid, 100)
    # a run that died after the detach, before the copy
    conn.execute(f"ALTER TABLE broadcast_recipients DETACH PARTITION "  # type: ignore[arg-type]
                 f"{pgname(conn, detached)}")
    report = retention.run(conn, 90 * DAY)
    assert set(report.ids) == {detached, pending} and report.recipients == 20
    assert conn.execute("SELECT count(*) AS n FROM broadcast_recipients_archive").fetchone() == {
        "n": 20}


def test_a_broadcast_sent_again_after_the_detach_gets_its_partition_back(conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = sent_broadcast(conn)
    conn.execute(f"ALTER TABLE broadcast_recipients DETACH PARTITION "  # type: ignore[arg-type]
                 f"{pgname(conn, bid)}")
    conn.execute("UPDATE broadcasts SET status = 'sending' WHERE id = %s", (bid,))
    assert conn.execute(QUERIES["retention_archive"], {"id": bid}).fetchone() == {
        "archived": None}
    assert partition_attached(conn, bid)
    assert len(support.status_counts(conn, bid)) == 2  # its rows are live again


def pgname(conn: Conn, bid: uuid.UUID) -> str:
    row = conn.execute("SELECT pgcast_partition_name_v1(%s) AS p", (bid,)).fetchone()
    assert row is not None
    return str(row["p"])


def test_ages_are_parsed_with_units() -> None:
    assert retention.parse_age("90d") == 90 * DAY
    assert retention.parse_age("12h") == 12 * 3600
    assert retention.parse_age("30m") == 1800 and retention.parse_age("45s") == 45
    assert retention.parse_age("7") == 7 * DAY
    for bad in ("", "-1d", "90 days", "1y", "1mon"):
        with pytest.raises(errors.InvalidInput):
            retention.parse_age(bad)


def test_minutes_and_months_each_have_a_spelling_that_says_which() -> None:
    """Issue 31: `--older-than 1m` meant minutes, silently, where months were meant."""
    assert retention.parse_age("30min") == retention.parse_age("30m") == 1800
    assert retention.parse_age("3mo") == retention.parse_age("3M") == 90 * DAY
    assert retention.parse_age("2w") == 14 * DAY
    assert retention.minutes_note("30min") is None and retention.minutes_note("3mo") is None
    assert retention.minutes_note("1m") == (
        "pgcast: --older-than 1m means minutes (write 1min to say so; months are 1mo)")


def test_the_command_says_when_m_means_minutes(db_url: str, conn: Conn) -> None:
    support.seed_contacts(conn, 3)
    bid = sent_broadcast(conn)
    age(conn, bid, 2)  # finished two days ago: older than a minute, younger than a month
    month = support.pgcast(db_url, "retention", "--older-than", "1mo", "--dry-run")
    assert json.loads(month.stdout)["broadcasts"] == 0 and month.stderr == ""
    minute = support.pgcast(db_url, "retention", "--older-than", "1m", "--dry-run")
    assert json.loads(minute.stdout)["broadcasts"] == 1
    assert "1m means minutes" in minute.stderr and "months are 1mo" in minute.stderr
    bad = support.pgcast(db_url, "retention", "--older-than", "1 month", check=False)
    assert bad.returncode == 2 and "3mo (or 3M: months of 30 days)" in bad.stderr


def test_the_command_archives_and_prints_what_it_did(db_url: str, conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = sent_broadcast(conn)
    age(conn, bid, 2)
    out = support.pgcast(db_url, "retention", "--older-than", "1d", "--dry-run")
    assert json.loads(out.stdout) | {"seconds": 0} == {
        "dry_run": True, "broadcasts": 1, "recipients": 10, "tracking_months": 0,
        "seconds": 0}
    assert partition_attached(conn, bid)
    out = support.pgcast(db_url, "retention", "--older-than", "1d")
    assert json.loads(out.stdout)["broadcasts"] == 1 and not partition_attached(conn, bid)
    bad = support.pgcast(db_url, "retention", "--older-than", "soon", check=False)
    assert bad.returncode == 2 and "--older-than" in bad.stderr
    found = support.pgcast(db_url, "lookup", str(bid), "User9@Example.com")
    row = json.loads(found.stdout)
    assert (row["status"], row["archived"], row["email"]) == ("sent", True, "user9@example.com")
    assert row["provider_message_id"] and row["sent_at"]
    assert support.pgcast(db_url, "lookup", str(bid), "x@example.com", check=False
                          ).returncode == 1


def test_a_detach_cancelled_half_way_is_finalized(db_url: str, conn: Conn) -> None:
    support.seed_contacts(conn, 10)
    bid = sent_broadcast(conn)
    age(conn, bid, 100)
    with psycopg.connect(db_url) as reader, psycopg.connect(db_url, autocommit=True) as detacher:
        # an open snapshot that has seen the partition: the detach's second phase waits for it
        reader.execute("SELECT count(*) FROM broadcast_recipients")
        pid = detacher.info.backend_pid
        thread, out = d.in_thread(lambda: detacher.execute(
            f"ALTER TABLE broadcast_recipients DETACH PARTITION "  # type: ignore[arg-type]
            f"{pgname(conn, bid)} CONCURRENTLY"))
        support.wait_for(lambda: conn.execute(
            "SELECT 1 FROM pg_inherits WHERE inhdetachpending").fetchone(),
            what="the detach to be pending")
        conn.execute("SELECT pg_cancel_backend(%s)", (pid,))
        thread.join(30)
        assert isinstance(out.get("error"), psycopg.errors.QueryCanceled)
        reader.rollback()
    report = retention.run(conn, 90 * DAY)
    assert report.ids == [bid] and report.recipients == 10
    assert conn.execute("SELECT 1 FROM pg_inherits WHERE inhdetachpending").fetchone() is None
