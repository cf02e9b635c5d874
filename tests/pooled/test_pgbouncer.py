"""Two workers and the API with every connection through PgBouncer in transaction mode."""

from __future__ import annotations

import collections
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests import support
from tests.integration import test_api_helpers as h

pytestmark = pytest.mark.acceptance
Conn = psycopg.Connection[dict[str, Any]]
N = 600  # contacts: at 150 emails/s a broadcast takes 4 s, long enough to pause and cancel
RATE = "150"  # emails/s, the global bucket


def _terminal(http: httpx.Client, bid: str, statuses: tuple[str, ...]) -> dict[str, Any] | None:
    p: dict[str, Any] = http.get(f"/broadcasts/{bid}/progress").json()
    return p if p["status"] in statuses else None


def test_workers_and_api_through_pgbouncer_send_exactly_once(
        db_url: str, conn: Conn, procs: support.Processes, ses: support.MotoServer,
        pgbouncer: support.PgBouncer) -> None:
    pooled = pgbouncer.url(db_url)
    ses.verify("news@example.com")
    env = {**ses.env(), "PGCAST_PROVIDER": "ses", "PGCAST_RATE": RATE,
           "PGCAST_JWT_SECRET": h.SECRET}
    port = support.free_port()
    base = f"http://127.0.0.1:{port}"
    api = procs.start(pooled, "api", "--port", str(port), **env)
    support.wait_for(lambda: h.api_up(base) or api.poll() is not None, timeout=30,
                     what="pgcast api")
    assert api.poll() is None, procs.log(api)
    # one worker LISTENs on a direct connection, the other has none and polls
    workers = [procs.start(pooled, "worker", "--concurrency", "3", "--batch-size", "100",
                           PGCAST_LISTEN_URL=db_url, **env),
               procs.start(pooled, "worker", "--concurrency", "3", "--batch-size", "100",
                           **env)]
    auth = {"Authorization": f"Bearer {h.token()}"}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as http:
        people = [{"email": f"p{i}@example.com", "tags": ["all"]} for i in range(N)]
        assert http.post("/contacts", json={"contacts": people}).json()["upserted"] == N
        ids = []
        for subject in ("Paused", "Cancelled"):
            r = http.post("/broadcasts", json={"subject": subject, "from": "news@example.com",
                                               "text": "Hello.", "tag": "all"})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        paused, cancelled = ids

        # pause half-way, wait until no row is in a worker's hands, resume
        assert http.post(f"/broadcasts/{paused}/send").json()["queued"] == N
        support.wait_for(lambda: http.get(f"/broadcasts/{paused}/progress").json()["sent"]
                         >= N // 4, timeout=60, what="a quarter sent")
        assert http.post(f"/broadcasts/{paused}/pause").json()["status"] == "paused"
        support.wait_for(lambda: not conn.execute(
            "SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s "
            "AND worker IS NOT NULL AND status IN ('claimed', 'sending')",
            (paused,)).fetchone(), timeout=60, what="the claims released")
        at_pause = support.progress(conn, uuid.UUID(paused))
        assert at_pause["status"] == "paused" and at_pause["pending"] > 0, at_pause
        assert http.post(f"/broadcasts/{paused}/resume").json()["status"] == "sending"
        done = support.wait_for(lambda: _terminal(http, paused, ("sent", "failed")),
                                timeout=120, every=0.2, what="the resumed broadcast sent")
        assert done["status"] == "sent" and done["sent"] == N, done

        # cancel one that is sending
        assert http.post(f"/broadcasts/{cancelled}/send").json()["queued"] == N
        support.wait_for(lambda: http.get(f"/broadcasts/{cancelled}/progress").json()["sent"]
                         >= N // 4, timeout=60, what="a quarter sent")
        r = http.post(f"/broadcasts/{cancelled}/cancel")
        assert r.json()["status"] == "cancelled", r.text
        support.wait_for(lambda: not conn.execute(
            "SELECT 1 FROM broadcast_recipients WHERE broadcast_id = %s "
            "AND status IN ('pending', 'claimed', 'sending')", (cancelled,)).fetchone(),
            timeout=60, what="the cancelled broadcast's rows settled")

    stopped = support.progress(conn, uuid.UUID(cancelled))
    assert stopped["status"] == "cancelled" and 0 < stopped["sent"] < N, stopped
    assert stopped["sent"] + stopped["cancelled"] == N, stopped
    # exactly once: every sent row has one message, no address got two of one broadcast
    messages = ses.messages()
    by_subject = collections.Counter(
        (m["subject"], to) for m in messages for to in m["destinations"]["ToAddresses"])
    assert max(by_subject.values()) == 1
    for bid, subject in ((paused, "Paused"), (cancelled, "Cancelled")):
        support.assert_counters_true(conn, uuid.UUID(bid))
        rows = conn.execute("SELECT email, provider_message_id FROM broadcast_recipients "
                            "WHERE broadcast_id = %s AND status = 'sent'", (bid,)).fetchall()
        mailed = {to.split("<")[-1].rstrip(">") for (s, to) in by_subject if s == subject}
        assert mailed == {r["email"] for r in rows}
    assert {m["id"] for m in messages} == {r["provider_message_id"] for r in conn.execute(
        "SELECT provider_message_id FROM broadcast_recipients "
        "WHERE provider_message_id IS NOT NULL").fetchall()}
    for w in workers:
        assert procs.stop(w) == 0, procs.log(w)
        assert "Traceback" not in procs.log(w), procs.log(w)
    assert "Traceback" not in procs.log(api), procs.log(api)
