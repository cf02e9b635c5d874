"""Misbehaving people and machines: kill -9, cancel, pause/resume, unsubscribes, a Postgres
restart — asserted on the recipient rows and on what the SES server received."""

from __future__ import annotations

import collections
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcast.sql import broadcasts, embedded, migrate
from tests import support

Conn = psycopg.Connection[dict[str, Any]]
GROUP = 10  # --group-size of the workers in these tests
BATCH = 50  # --batch-size; a group this big makes the worker claim and hand off in one statement
# both dispatch paths: claim, then hand off in groups; and the direct claim-and-hand-off
PATHS = pytest.mark.parametrize("group", [GROUP, BATCH], ids=["groups", "direct"])


def ses_env(ses: support.MotoServer, **extra: str) -> dict[str, str]:
    return {**ses.env(), "PGCAST_PROVIDER": "ses", "PGCAST_RATE": "0",
            "PGCAST_LEASE_SECONDS": "3", "PGCAST_SWEEP_SECONDS": "1", **extra}


def worker_args(concurrency: int = 1, group: int = GROUP) -> list[str]:
    return ["worker", "--concurrency", str(concurrency), "--batch-size", str(BATCH),
            "--group-size", str(group)]


def deliveries(ses: support.MotoServer) -> collections.Counter[str]:
    """How many messages each address received."""
    return collections.Counter(to.split("<")[-1].rstrip(">")
                               for m in ses.messages() for to in m["destinations"]["ToAddresses"])


def rows_by_email(conn: Conn, bid: uuid.UUID) -> dict[str, dict[str, Any]]:
    rows = conn.execute("SELECT * FROM broadcast_recipients WHERE broadcast_id = %s",
                        (bid,)).fetchall()
    return {r["email"]: r for r in rows}


def server_now(conn: Conn) -> Any:
    """Postgres's clock, read after whatever the caller just committed."""
    row = conn.execute("SELECT clock_timestamp() AS t").fetchone()
    assert row is not None
    return row["t"]


def wait_sent_at_least(conn: Conn, bid: uuid.UUID, n: int) -> None:
    support.wait_for(lambda: support.progress(conn, bid)["sent"] >= n, timeout=120,
                     what=f"{n} sent")


def wait_status(conn: Conn, bid: uuid.UUID, *statuses: str, timeout: float = 180) -> dict[str, Any]:
    return support.wait_for(lambda: (p := support.progress(conn, bid))["status"] in statuses and p,
                            timeout=timeout, every=0.1, what=f"status in {statuses}")


def wait_nothing_in_flight(conn: Conn, bid: uuid.UUID) -> None:
    support.wait_for(lambda: not conn.execute(
        "SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s "
        "AND status IN ('claimed', 'sending') LIMIT 1", (bid,)).fetchone(),
        timeout=60, what="in-flight groups to finish")



def wait_all_sent_once(conn: Conn, ses: support.MotoServer, bid: uuid.UUID, n: int,
                       timeout: float = 180) -> None:
    """The broadcast finishes `sent`, its counters match its rows, and each of its n
    recipients received exactly one message."""
    wait_status(conn, bid, "sent", timeout=timeout)
    p = support.assert_counters_true(conn, bid)
    assert p["sent"] == n, p
    got = deliveries(ses)
    assert len(got) == n and max(got.values()) == 1


# 20 recipients in the middle of a 1,000-recipient broadcast
MID_LIST = ("SELECT contact_id FROM broadcast_recipients WHERE broadcast_id = %(id)s "
            "ORDER BY contact_id OFFSET 400 LIMIT 20")

@PATHS
def test_kill_9_workers_repeatedly(conn: Conn, db_url: str, ses: support.MotoServer,
                                   procs: support.Processes, group: int) -> None:
    ses.verify("news@example.com")
    support.seed_contacts(conn, 2000)
    bid = support.new_broadcast(conn)
    env = ses_env(ses)
    live = [procs.start(db_url, *worker_args(group=group), **env) for _ in range(3)]
    rng = random.Random(5)
    kills = 0
    while kills < 6 and support.progress(conn, bid)["status"] == "sending":
        sent = support.progress(conn, bid)["sent"]
        if sent >= 1800:
            break
        wait_sent_at_least(conn, bid, sent + 150)
        victim = live.pop(rng.randrange(len(live)))
        procs.stop(victim, signal.SIGKILL)
        kills += 1
        live.append(procs.start(db_url, *worker_args(group=group), **env))
    assert kills >= 3
    p = wait_status(conn, bid, "sent", "failed")
    p = support.assert_counters_true(conn, bid)
    assert p["pending"] == 0 and p["sent"] + p["unknown"] == 2000, p
    # with --concurrency 1, a kill leaves at most one group in the provider's hands
    assert p["unknown"] <= kills * group, (p, kills)
    got = deliveries(ses)
    rows = rows_by_email(conn, bid)
    assert max(got.values()) == 1  # nobody mailed twice
    for address, row in rows.items():
        if row["status"] == "sent":
            assert got[address] == 1, row
        else:
            assert row["status"] == "unknown" and got[address] <= 1, row
    assert set(got) <= set(rows)


@PATHS
def test_cancel_mid_send(conn: Conn, db_url: str, ses: support.MotoServer,
                         procs: support.Processes, group: int) -> None:
    ses.verify("news@example.com")
    support.seed_contacts(conn, 3000)
    bid = support.new_broadcast(conn)
    for _ in range(3):
        procs.start(db_url, *worker_args(concurrency=2, group=group), **ses_env(ses))
    wait_sent_at_least(conn, bid, 300)
    result = broadcasts.cancel(conn, "default", bid)
    committed = server_now(conn)
    assert result["success"] is True and result["status"] == "cancelled"
    wait_nothing_in_flight(conn, bid)
    p = support.assert_counters_true(conn, bid)
    assert p["status"] == "cancelled"
    late = conn.execute("SELECT count(*) AS n FROM broadcast_recipients WHERE broadcast_id = %s "
                        "AND handed_at > %s", (bid, committed)).fetchone()
    # the issue allows one in-flight group per worker; the fence gives none at all
    assert late is not None and late["n"] == 0
    handed = p["sent"] + p["failed"] + p["unknown"]
    # handed off before the cancel but never sent: a call that would have started too late
    # after its handoff (a loaded machine), a throttle or a transient error, recorded after
    # the cancel: those rows end cancelled, with the reason kept
    uncalled = conn.execute("SELECT count(*) AS n FROM broadcast_recipients WHERE "
                            "broadcast_id = %s AND status = 'cancelled' AND last_error IS NOT "
                            "NULL", (bid,)).fetchone()
    assert uncalled is not None
    assert handed + uncalled["n"] == result["alreadyQueued"], (p, result, uncalled)
    assert p["cancelled"] == 3000 - handed
    got = deliveries(ses)
    assert sum(got.values()) == p["sent"] and max(got.values()) == 1


@PATHS
def test_pause_wait_resume(conn: Conn, db_url: str, ses: support.MotoServer,
                           procs: support.Processes, group: int) -> None:
    ses.verify("news@example.com")
    support.seed_contacts(conn, 1500)
    bid = support.new_broadcast(conn)
    for _ in range(2):
        procs.start(db_url, *worker_args(concurrency=2, group=group), **ses_env(ses))
    wait_sent_at_least(conn, bid, 200)
    assert broadcasts.pause(conn, "default", bid)["success"]
    paused_at = server_now(conn)
    wait_nothing_in_flight(conn, bid)
    frozen = support.progress(conn, bid)
    assert frozen["status"] == "paused" and frozen["pending"] > 0
    # the workers poll at least once a second: give them a few chances to misbehave
    time.sleep(3)
    assert support.progress(conn, bid)["sent"] == frozen["sent"]
    late = conn.execute("SELECT count(*) AS n FROM broadcast_recipients WHERE broadcast_id = %s "
                        "AND handed_at > %s", (bid, paused_at)).fetchone()
    assert late is not None and late["n"] == 0
    assert broadcasts.resume(conn, "default", bid)["success"]
    wait_all_sent_once(conn, ses, bid, 1500)


@PATHS
def test_rows_a_rolled_back_transaction_held_are_still_sent(conn: Conn, db_url: str,
                                                            ses: support.MotoServer,
                                                            procs: support.Processes,
                                                            group: int) -> None:
    """Claims skip locked rows and move on: rows that a transaction locked while the workers
    walked past, and then rolled back, are still sent, once, and only then is the broadcast
    finished."""
    ses.verify("news@example.com")
    support.seed_contacts(conn, 1000)
    bid = support.new_broadcast(conn)
    with psycopg.connect(db_url) as holder:
        # what a claim that then rolls back does: lock fresh rows, mid-way through the list
        # (a subquery: FOR UPDATE also locks the rows an OFFSET skips)
        held = holder.execute(
            "SELECT contact_id FROM broadcast_recipients WHERE broadcast_id = %(id)s "
            f"AND contact_id IN ({MID_LIST}) FOR UPDATE", {"id": bid}).fetchall()
        assert len(held) == 20
        for _ in range(2):
            procs.start(db_url, *worker_args(concurrency=2, group=group), **ses_env(ses))
        wait_sent_at_least(conn, bid, 980)
        time.sleep(2)  # two poll intervals of claims that find nothing free
        p = support.progress(conn, bid)
        assert (p["status"], p["sent"]) == ("sending", 980), p
        assert support.status_counts(conn, bid) == {"sent": 980, "pending": 20}
        holder.rollback()
    wait_all_sent_once(conn, ses, bid, 1000, timeout=60)


@PATHS
def test_rows_whose_claim_a_crash_lost_are_still_sent(conn: Conn, db_url: str,
                                                      ses: support.MotoServer,
                                                      procs: support.Processes,
                                                      group: int) -> None:
    """A claim commits asynchronously, so a server crash can lose it: its rows are then
    never-claimed again, behind every worker's cursor, after the workers have stopped looking
    for such rows. They are still sent, once, and only then is the broadcast finished."""
    ses.verify("news@example.com")
    support.seed_contacts(conn, 1000)
    bid = support.new_broadcast(conn)
    # a claim of 20 rows mid-list by a worker that is gone (its lease has an hour to run)
    lost = conn.execute(
        "UPDATE broadcast_recipients SET status = 'claimed', worker = 'lost', "
        "claim_token = gen_random_uuid(), lease_expires_at = now() + interval '1 hour' "
        f"WHERE broadcast_id = %(id)s AND contact_id IN ({MID_LIST}) RETURNING contact_id",
        {"id": bid}).fetchall()
    assert len(lost) == 20
    for _ in range(2):
        procs.start(db_url, *worker_args(concurrency=2, group=group), **ses_env(ses))
    wait_sent_at_least(conn, bid, 980)
    time.sleep(2)  # claims that find nothing: the workers know no never-claimed row is left
    assert support.status_counts(conn, bid) == {"sent": 980, "claimed": 20}
    # what the server holds after a crash lost that claim's commit
    conn.execute("UPDATE broadcast_recipients SET status = 'pending', worker = NULL, "
                 "claim_token = NULL, lease_expires_at = NULL "
                 "WHERE broadcast_id = %s AND worker = 'lost'", (bid,))
    wait_all_sent_once(conn, ses, bid, 1000, timeout=60)


def test_a_busy_worker_comes_back_to_a_broadcast_whose_retries_came_due(
        conn: Conn, db_url: str, ses: support.MotoServer, procs: support.Processes) -> None:
    """One dispatch loop, two broadcasts: a small one whose recipients all wait for their
    retry time, and a big one that keeps the loop busy. When the retries come due, the small
    broadcast is served before the big one ends."""
    ses.verify("news@example.com")
    support.seed_contacts(conn, 5, tag="small")
    support.seed_contacts(conn, 6000, start=5)
    small = support.new_broadcast(conn, tag="small")
    # its five recipients were tried and throttled: due again in 3 seconds
    conn.execute("UPDATE broadcast_recipients SET worker = 'earlier', attempts = 1, "
                 "retry_at = clock_timestamp() + interval '3 seconds' WHERE broadcast_id = %s",
                 (small,))
    big = support.new_broadcast(conn)
    # 1,000/s: the big broadcast takes about 6 seconds, during which the loop is never idle
    procs.start(db_url, *worker_args(concurrency=1), **ses_env(ses, PGCAST_RATE="1000",
                                                                PGCAST_BURST="50"))
    wait_status(conn, small, "sent", timeout=60)
    assert support.progress(conn, big)["status"] == "sending"
    wait_status(conn, big, "sent", timeout=120)


def test_unsubscribes_during_the_send(conn: Conn, db_url: str, ses: support.MotoServer,
                                      procs: support.Processes) -> None:
    ses.verify("news@example.com")
    support.seed_contacts(conn, 2000)
    bid = support.new_broadcast(conn)
    # 200/s: the send takes about ten seconds, long enough to unsubscribe people mid-way
    for _ in range(2):
        procs.start(db_url, *worker_args(concurrency=2), **ses_env(ses, PGCAST_RATE="200",
                                                                    PGCAST_BURST="10"))
    wait_sent_at_least(conn, bid, 100)
    rng = random.Random(11)
    tail = [f"user{i}@example.com" for i in range(1950, 2000)]  # claimed last
    anywhere = [f"user{i}@example.com" for i in rng.sample(range(1950), 50)]
    done_at: dict[str, Any] = {}
    for address in tail + anywhere:
        conn.execute("UPDATE contacts SET unsubscribed_at = clock_timestamp() WHERE email = %s",
                     (address,))
        done_at[address] = server_now(conn)
    p = wait_status(conn, bid, "sent")
    p = support.assert_counters_true(conn, bid)
    rows = rows_by_email(conn, bid)
    got = deliveries(ses)
    for address in tail:
        assert rows[address]["status"] == "skipped" and got[address] == 0
    for address, t in done_at.items():
        row = rows[address]
        if got[address]:
            # mailed only if its handoff began before the unsubscribe had committed
            assert row["status"] == "sent" and row["handed_at"] < t, row
        else:
            assert row["status"] == "skipped", row
        if row["handed_at"] is not None and row["handed_at"] > t:
            raise AssertionError(f"handed off after the unsubscribe committed: {row}")
    assert p["skipped"] >= len(tail)
    assert max(got.values()) == 1 and p["sent"] == sum(got.values())


def test_postgres_restart_mid_send(ses: support.MotoServer, procs: support.Processes) -> None:
    base = Path(tempfile.mkdtemp(prefix="pgcast-restart-"))
    base.chmod(0o755)
    url = embedded.start(base)
    try:
        with psycopg.connect(url) as c:
            migrate.migrate(c)
        ses.verify("news@example.com")
        with support.connect(url) as conn:
            support.seed_contacts(conn, 2000)
            bid = support.new_broadcast(conn)
            for _ in range(2):
                procs.start(url, *worker_args(concurrency=2),
                            **ses_env(ses, PGCAST_LEASE_SECONDS="30", PGCAST_RATE="300",
                                      PGCAST_BURST="10"))
            wait_sent_at_least(conn, bid, 300)
        embedded.stop(base, mode="fast")
        time.sleep(2)
        # a new process, as a person would: pgserver caches servers per process
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from sql import embedded; embedded.start(Path(sys.argv[1]))", str(base)],
                       cwd=support.ROOT, check=True, timeout=60)
        with support.connect(url) as conn:
            p = wait_status(conn, bid, "sent", timeout=240)
            p = support.assert_counters_true(conn, bid)
            assert p["sent"] + p["unknown"] == 2000 and p["unknown"] == 0, p
            got = deliveries(ses)
            assert len(got) == 2000 and max(got.values()) == 1
    finally:
        procs.cleanup()
        embedded.discard(base)
