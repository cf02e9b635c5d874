"""An account-level refusal stops the calls of its group that are still waiting in the pacer
(issue 26): a real `pgcast worker` sends through real boto3 to moto's SES server, with
tests.faultproxy in between answering as SES does when the account may not send, and counting
the SendEmail requests that reach it.

The ses provider paces at the wire (after boto3 has built and signed a request), so a group's
calls pass the sender's stop check at once and then wait in the pacer, one every 1 / rate.
Here the refusal is answered half the pacer's interval after the first call (messages: 1/s
and 0.5 s; broadcasts: 2/s and 0.25 s): every other call of the group has long passed the
check before the pacer and is still waiting when the refusal comes back. Each must be stopped
there, not sent to be refused once more: without that, every call of the group reached the
endpoint (4 of 4 messages, 2 of 2 recipients).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests import faultproxy, support

pytestmark = pytest.mark.acceptance

Conn = psycopg.Connection[dict[str, Any]]
SENDER = "shop@example.com"
N = 4  # one group: the first call is refused, the other N - 1 wait 1, 2, 3 s in the pacer
HELD = 0.5  # seconds the refusal is held back: less than the pacer's 1 s between calls


def worker_env(db_url: str, ses: support.MotoServer, proxy: faultproxy.FaultProxy,
               rate: int = 1) -> dict[str, str]:
    """A worker on the ses provider through the proxy, paced at `rate` calls a second."""
    return support.pgcast_env(db_url, **{**ses.env(), **proxy.env()}, PGCAST_PROVIDER="ses",
                              PGCAST_RATE=str(rate), PGCAST_BURST="20")


def full_bucket(conn: Conn) -> None:
    """Tokens for the whole group at once: one handoff takes all N."""
    conn.execute("UPDATE rate_limits SET tokens = 20, refilled_at = now() - interval '1 hour' "
                 "WHERE name = 'global'")


def test_a_refusal_stops_the_message_calls_waiting_in_the_pacer(
        conn: Conn, db_url: str, ses: support.MotoServer) -> None:
    ses.verify(SENDER)
    for i in range(N):
        conn.execute("SELECT pgcast_send_message('acme', %s, 'Your code', 'x', NULL, %s, NULL)",
                     (f"user{i}@example.com", SENDER))
    full_bucket(conn)
    with faultproxy.running(ses.url) as proxy:
        proxy.set_rules(faultproxy.sending_paused(delay=HELD))
        support.pgcast(db_url, "worker", "--once", env=worker_env(db_url, ses, proxy))
        reached = proxy.send_requests
    # only the first call reached the endpoint: the others were stopped after their wait
    assert reached < N, reached
    rows = conn.execute(
        "SELECT status, attempts, not_before > clock_timestamp() + interval '30 seconds' AS "
        "parked, last_error FROM messages").fetchall()
    # stopped or refused, each is put back the same way: queued, no attempt, parked
    assert {(r["status"], r["attempts"], r["parked"]) for r in rows} == {("queued", 0, True)}
    assert len(rows) == N and all("paused" in (r["last_error"] or "").lower() for r in rows)


def test_a_refusal_stops_the_broadcast_calls_waiting_in_the_pacer(
        conn: Conn, db_url: str, ses: support.MotoServer) -> None:
    ses.verify(SENDER)
    support.seed_contacts(conn, N)
    bid = support.new_broadcast(conn, from_address=SENDER)
    full_bucket(conn)
    with faultproxy.running(ses.url) as proxy:
        # at 2/s a claim holds a second of sending: a group of 2, the second call waiting
        # 0.5 s in the pacer, the refusal answered after 0.25 s
        proxy.set_rules(faultproxy.sending_paused(delay=HELD / 2))
        support.pgcast(db_url, "worker", "--once", "--concurrency", "1", "--group-size", "2",
                       env=worker_env(db_url, ses, proxy, rate=2))
        reached = proxy.send_requests
    assert reached < 2, reached  # the group's second call was stopped in the pacer
    p = support.assert_counters_true(conn, bid)
    assert (p["status"], p["paused_reason"]) == ("paused", "sending_paused")
    untouched = conn.execute("SELECT count(*) AS n FROM broadcast_recipients WHERE "
                             "broadcast_id = %s AND status = 'pending' AND attempts = 0",
                             (bid,)).fetchone()
    assert untouched is not None and untouched["n"] == N
