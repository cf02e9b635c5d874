"""Reconciliation end to end (issue 25): real workers send through tests.faultproxy to moto's
SES; the proxy loses some answers (SES took the message) or drops some requests (SES never
saw them). Lost answers end `unknown`, then `sent` with SES's message id once their signed
Send events reach the webhook (the app in-process, the test certificate behind its seam);
dropped requests are requeued once by the sweeper (PGCAST_RECONCILE_AFTER) and each person is
mailed exactly once."""

from __future__ import annotations

import email.utils
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests import faultproxy, support
from tests import snsmessages as m
from tests.integration import test_api_helpers as h
from tests.integration import test_feedback_webhook as fw

pytestmark = pytest.mark.acceptance

Conn = psycopg.Connection[dict[str, Any]]
SENDER = "news@example.com"
RECIPIENTS = 500
EVERY = 50  # 2 % of the SendEmail calls
WAIT = 180.0  # seconds


@pytest.fixture
def proxy(ses: support.MotoServer) -> Iterator[faultproxy.FaultProxy]:
    ses.verify(SENDER)
    with faultproxy.running(ses.url) as p:
        yield p


@pytest.fixture
def hook(db_url: str) -> Iterator[fw.Hook]:
    fetcher = m.Fetcher()
    with h.client(db_url) as api:
        api.app.state.feedback = fw.feedback(fetcher, guard_min=10_000)
        yield fw.Hook(api, fetcher)


def by_address(ses: support.MotoServer) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for msg in ses.messages():
        for to in msg["destinations"]["ToAddresses"]:
            out.setdefault(email.utils.parseaddr(to)[1], []).append(msg)
    return out


def settled(conn: Conn, bid: uuid.UUID) -> dict[str, int] | None:
    counts = support.status_counts(conn, bid)
    busy = counts.get("pending") or counts.get("claimed") or counts.get("sending")
    return None if busy else counts


def run(conn: Conn, db_url: str, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy, **env: str) -> uuid.UUID:
    support.seed_contacts(conn, RECIPIENTS)
    full = {**ses.env(), **proxy.env(), "PGCAST_PROVIDER": "ses", "PGCAST_RATE": "0", **env}
    for _ in range(2):
        procs.start(db_url, "worker", **full)
    return support.new_broadcast(conn, from_address=SENDER)


def test_lost_answers_end_unknown_then_sent_with_ses_message_id_from_send_events(
        conn: Conn, db_url: str, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy, hook: fw.Hook) -> None:
    proxy.set_rules(faultproxy.answer_lost(EVERY))
    bid = run(conn, db_url, procs, ses, proxy)
    support.wait_for(lambda: support.progress(conn, bid)["status"] in ("sent", "failed"),
                     timeout=WAIT, what="the broadcast to finish")
    unknown = [dict(r) for r in conn.execute(
        "SELECT contact_id, email FROM broadcast_recipients WHERE broadcast_id = %s "
        "AND status = 'unknown' ORDER BY contact_id", (bid,))]
    assert len(unknown) == proxy.injected >= RECIPIENTS // EVERY - 2, (len(unknown),
                                                                       proxy.injected)
    accepted = by_address(ses)
    for r in unknown:
        [msg] = accepted[r["email"]]  # SES did take it, once
        ev = m.ses_event("Send", r["email"], broadcast=bid, contact=r["contact_id"])
        ev["mail"]["messageId"] = msg["id"]
        answer = hook.post(m.notification(ev, version="2")).json()
        assert answer.get("reconciled") == "sent", answer
        got = conn.execute("SELECT status, provider_message_id FROM broadcast_recipients "
                           "WHERE broadcast_id = %s AND contact_id = %s",
                           (bid, r["contact_id"])).fetchone()
        assert got is not None and (got["status"], got["provider_message_id"]) == (
            "sent", msg["id"])
    p = support.assert_counters_true(conn, bid)
    assert (p["sent"], p["unknown"]) == (RECIPIENTS, 0), p
    assert set(Counter({a: len(v) for a, v in by_address(ses).items()}).values()) == {1}


def test_dropped_requests_are_requeued_once_and_everyone_is_mailed_exactly_once(
        conn: Conn, db_url: str, procs: support.Processes, ses: support.MotoServer,
        proxy: faultproxy.FaultProxy) -> None:
    drops = RECIPIENTS // EVERY
    # a requeued send is never dropped again: it is requeued once, and would stay unknown
    proxy.set_rules(faultproxy.dropped(EVERY, limit=drops, once_each=True))
    bid = run(conn, db_url, procs, ses, proxy, PGCAST_RECONCILE_AFTER="2s",
              PGCAST_SWEEP_SECONDS="1")
    support.wait_for(lambda: proxy.injected == drops, timeout=WAIT, what="the drops")
    counts = support.wait_for(
        lambda: (c := settled(conn, bid)) is not None and c.get("sent") == RECIPIENTS and c,
        timeout=WAIT, what="the requeued rows to be sent")
    assert counts == {"sent": RECIPIENTS}, counts
    p = support.assert_counters_true(conn, bid)
    got = conn.execute("SELECT unknown_requeued FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert got is not None and got["unknown_requeued"] == drops, (got, p)
    mailed = by_address(ses)
    assert len(mailed) == RECIPIENTS and {len(v) for v in mailed.values()} == {1}
