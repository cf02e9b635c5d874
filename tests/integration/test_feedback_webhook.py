"""POST /webhooks/ses on a real Postgres with real signed SNS messages (tests.snsmessages)."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgcast.api import sns, webhooks
from tests import snsmessages as m
from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT


class Hook:
    """The app with the test certificate behind the verifier's fetch seam."""

    def __init__(self, api: h.Api, fetcher: m.Fetcher) -> None:
        self.api, self.fetcher = api, fetcher

    def post(self, message: dict[str, Any]) -> Any:
        """POST one SNS message the way SNS does (text/plain JSON)."""
        return self.api.post("/webhooks/ses", content=json.dumps(message),
                             headers={"Content-Type": "text/plain; charset=UTF-8",
                                      "x-amz-sns-message-type": message.get("Type", "")})


def feedback(fetcher: m.Fetcher, **kw: Any) -> webhooks.Feedback:
    """The webhook's configuration with the test topic and certificate seam."""
    max_age = kw.pop("max_age", webhooks.DEFAULT_MAX_AGE)
    return webhooks.Feedback(sns.Verifier(frozenset({m.TOPIC}), max_age, fetch=fetcher), **kw)


@pytest.fixture
def hook(db_url: str) -> Iterator[Hook]:
    fetcher = m.Fetcher()
    with h.client(db_url) as api:
        api.app.state.feedback = feedback(fetcher)
        yield Hook(api, fetcher)


def sending(conn: Conn, n: int = 5, account: str = A) -> tuple[uuid.UUID, list[dict[str, Any]]]:
    """A sending broadcast of n contacts whose rows are all sent (as a worker records them)."""
    support.seed_contacts(conn, n, account=account)
    bid = support.new_broadcast(conn, account=account)
    conn.execute("UPDATE broadcast_recipients SET status = 'sent', worker = 'w', sent_at = now() "
                 "WHERE broadcast_id = %s", (bid,))
    conn.execute("UPDATE broadcasts SET sent = total WHERE id = %s", (bid,))
    rows = conn.execute("SELECT contact_id, email FROM broadcast_recipients "
                        "WHERE broadcast_id = %s ORDER BY contact_id", (bid,)).fetchall()
    return bid, [dict(r) for r in rows]


def contact(conn: Conn, cid: int) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM contacts WHERE id = %s", (cid,)).fetchone()
    assert row is not None
    return dict(row)


def recipient(conn: Conn, bid: uuid.UUID, cid: int) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM broadcast_recipients WHERE broadcast_id = %s "
                       "AND contact_id = %s", (bid, cid)).fetchone()
    assert row is not None
    return dict(row)


def events(conn: Conn, cid: int) -> list[tuple[str, str]]:
    return [(r["action"], r["source"]) for r in conn.execute(
        "SELECT action, source FROM contact_events WHERE contact_id = %s ORDER BY id", (cid,))]


def assert_feedback_counters_true(conn: Conn, bid: uuid.UUID) -> dict[str, Any]:
    """delivered/bounced/complained on the broadcast row equal count(*) over its rows."""
    p = support.progress(conn, bid)
    row = conn.execute(
        "SELECT count(delivered_at) AS delivered, count(bounced_at) AS bounced, "
        "count(complained_at) AS complained FROM broadcast_recipients WHERE broadcast_id = %s",
        (bid,)).fetchone()
    assert row is not None
    assert (p["delivered"], p["bounced"], p["complained"]) == (
        row["delivered"], row["bounced"], row["complained"])
    return p


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("shape", ["eventType", "notificationType"])
def test_a_signed_hard_bounce_suppresses_the_contact_and_marks_its_row(
        hook: Hook, conn: Conn, version: str, shape: str) -> None:
    bid, rows = sending(conn)
    r0 = rows[0]
    msg = m.notification(m.ses_event("Bounce", r0["email"], broadcast=bid,
                                     contact=r0["contact_id"], shape=shape), version=version,
                         subject="Amazon SES Email Event Notification")
    r = hook.post(msg)
    assert (r.status_code, r.json()) == (200, {"outcome": "applied"}), r.text
    c = contact(conn, r0["contact_id"])
    assert c["suppressed_reason"] == "bounce" and c["suppressed_at"] is not None
    assert "550 5.1.1 user unknown" in c["suppressed_detail"]
    assert recipient(conn, bid, r0["contact_id"])["bounced_at"] is not None
    assert assert_feedback_counters_true(conn, bid)["bounced"] == 1
    assert events(conn, r0["contact_id"]) == [("suppress", "ses")]
    assert hook.fetcher.urls == [m.CERT_URL]


def test_the_certificate_is_fetched_once(hook: Hook, conn: Conn) -> None:
    bid, rows = sending(conn)
    for r0 in rows:
        ev = m.ses_event("Delivery", r0["email"], broadcast=bid, contact=r0["contact_id"])
        assert hook.post(m.notification(ev, version="2")).status_code == 200
    assert hook.fetcher.urls == [m.CERT_URL]
    assert assert_feedback_counters_true(conn, bid)["delivered"] == len(rows)


def test_a_duplicate_delivery_changes_nothing(hook: Hook, conn: Conn) -> None:
    bid, rows = sending(conn)
    r0 = rows[0]
    msg = m.notification(m.ses_event("Complaint", r0["email"], broadcast=bid,
                                     contact=r0["contact_id"]))
    assert hook.post(msg).json() == {"outcome": "applied"}
    before = (contact(conn, r0["contact_id"]), support.progress(conn, bid),
              events(conn, r0["contact_id"]))
    for _ in range(2):  # SNS retries and duplicates carry the same MessageId
        r = hook.post(msg)
        assert (r.status_code, r.json()) == (200, {"outcome": "duplicate"})
    assert (contact(conn, r0["contact_id"]), support.progress(conn, bid),
            events(conn, r0["contact_id"])) == before
    assert before[1]["complained"] == 1


def _stale() -> str:
    return m.stamp(dt.datetime.now(dt.UTC) - dt.timedelta(hours=25))


REFUSALS = {
    "wrong topic": lambda ev: m.notification(ev, topic=m.TOPIC + "-other"),
    "stale timestamp": lambda ev: m.notification(ev, timestamp=_stale()),
    "future timestamp": lambda ev: m.notification(
        ev, timestamp=m.stamp(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))),
    "certificate on another host": lambda ev: m.notification(
        ev, cert_url="https://sns.us-east-1.amazonaws.com.evil.example/cert.pem"),
    "certificate host as a substring": lambda ev: m.notification(
        ev, cert_url="https://evil.example/sns.us-east-1.amazonaws.com/cert.pem"),
    "certificate over http": lambda ev: m.notification(
        ev, cert_url=m.CERT_URL.replace("https", "http")),
    "certificate with credentials": lambda ev: m.notification(
        ev, cert_url=m.CERT_URL.replace("https://", "https://x@")),
    "certificate on another port": lambda ev: m.notification(
        ev, cert_url=m.CERT_URL.replace(".com/", ".com:8443/")),
    "certificate not a .pem": lambda ev: m.notification(
        ev, cert_url=m.CERT_URL.replace(".pem", ".txt")),
    "unknown signature version": lambda ev: {**m.notification(ev), "SignatureVersion": "3"},
    "signature not base64": lambda ev: {**m.notification(ev), "Signature": "not base64!"},
    "missing MessageId": lambda ev: {k: v for k, v in m.notification(ev).items()
                                     if k != "MessageId"},
    "subscription to a foreign host": lambda ev: m.subscription(
        subscribe_url="https://evil.example/?Action=ConfirmSubscription"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_messages_fetch_nothing_and_change_nothing(
        hook: Hook, conn: Conn, case: str, caplog: pytest.LogCaptureFixture) -> None:
    bid, rows = sending(conn)
    r0 = rows[0]
    ev = m.ses_event("Bounce", r0["email"], broadcast=bid, contact=r0["contact_id"])
    r = hook.post(REFUSALS[case](ev))
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "refused"
    assert any("SNS message refused" in x.getMessage() for x in caplog.records)
    # the topic is checked after the signature (an unsigned message learns nothing of it)
    assert hook.fetcher.urls == ([m.CERT_URL] if case == "wrong topic" else [])
    assert contact(conn, r0["contact_id"])["suppressed_at"] is None
    assert support.progress(conn, bid)["bounced"] == 0
    assert conn.execute("SELECT count(*) AS n FROM sns_messages").fetchone() == {"n": 0}


def test_a_forged_signature_is_refused_without_any_fetch(hook: Hook, conn: Conn) -> None:
    bid, rows = sending(conn)
    r0, r1 = rows[0], rows[1]
    ev = m.ses_event("Delivery", r0["email"], broadcast=bid, contact=r0["contact_id"])
    assert hook.post(m.notification(ev)).json() == {"outcome": "applied"}
    assert hook.fetcher.urls == [m.CERT_URL]  # the certificate, once, for a valid message
    hook.fetcher.urls.clear()
    bounce = m.ses_event("Bounce", r0["email"], broadcast=bid, contact=r0["contact_id"])
    other = m.ses_event("Bounce", r1["email"], broadcast=bid, contact=r1["contact_id"])
    forged = [
        {**m.notification(bounce), "Message": json.dumps(other)},  # the body changed
        {**m.notification(bounce, version="2"), "SignatureVersion": "1"},  # the hash changed
        {**m.notification(bounce), "Signature": m.notification(other)["Signature"]},
        {**m.subscription(), "SubscribeURL": m.SUBSCRIBE_URL + "&forged=1"},
    ]
    for msg in forged:
        r = hook.post(msg)
        assert (r.status_code, r.json()["message"]) == (403, webhooks.REFUSED)
    assert hook.fetcher.urls == []  # no certificate again, no SubscribeURL
    assert support.progress(conn, bid)["bounced"] == 0
    assert conn.execute("SELECT count(*) AS n FROM contacts WHERE suppressed_at IS NOT NULL"
                        ).fetchone() == {"n": 0}
    assert conn.execute("SELECT count(*) AS n FROM sns_messages").fetchone() == {"n": 1}


def test_on_a_cold_cache_a_forged_message_fetches_only_the_certificate(
        hook: Hook, conn: Conn) -> None:
    forged = {**m.subscription(), "SubscribeURL": m.SUBSCRIBE_URL + "&forged=1"}
    assert hook.post(forged).status_code == 403
    assert hook.fetcher.urls == [m.CERT_URL]  # checking a signature needs the key


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_subscription_is_confirmed_once_after_the_checks(
        hook: Hook, version: str, caplog: pytest.LogCaptureFixture) -> None:
    sub = m.subscription(version=version)
    r = hook.post(sub)
    assert (r.status_code, r.json()) == (200, {"outcome": "confirmed"})
    assert hook.fetcher.urls == [m.CERT_URL, m.SUBSCRIBE_URL]
    assert hook.post(sub).json() == {"outcome": "duplicate"}
    assert hook.fetcher.urls == [m.CERT_URL, m.SUBSCRIBE_URL]
    r = hook.post(m.subscription("UnsubscribeConfirmation", version=version))
    assert (r.status_code, r.json()) == (200, {"outcome": "unsubscribed"})
    assert hook.fetcher.urls == [m.CERT_URL, m.SUBSCRIBE_URL]  # logged, nothing fetched
    assert any("unsubscribed this endpoint" in x.getMessage() and x.levelname == "WARNING"
               for x in caplog.records)


def test_a_certificate_that_cannot_be_fetched_is_503_so_sns_retries(
        db_url: str, conn: Conn) -> None:
    def down(url: str) -> bytes:
        raise OSError("connection refused")

    bid, rows = sending(conn)
    ev = m.ses_event("Bounce", rows[0]["email"], broadcast=bid, contact=rows[0]["contact_id"])
    msg = m.notification(ev)
    with h.client(db_url) as api:
        api.app.state.feedback = feedback(down)  # type: ignore[arg-type]
        r = Hook(api, m.Fetcher()).post(msg)
        assert (r.status_code, r.json()["error"]) == (503, "unavailable")
        api.app.state.feedback = feedback(m.Fetcher())
        assert Hook(api, m.Fetcher()).post(msg).json() == {"outcome": "applied"}  # the retry


def test_the_route_is_404_without_topics_and_needs_no_token(db_url: str) -> None:
    with h.client(db_url) as api:  # PGCAST_SNS_TOPIC_ARNS unset in the test environment
        assert api.app.state.feedback is None
        r = api.post("/webhooks/ses", content=json.dumps(m.subscription()))
        assert r.status_code == 404
        api.app.state.feedback = feedback(m.Fetcher())
        assert api.post("/webhooks/ses", content="{}").status_code == 403  # no JWT asked for


def test_from_env_reads_topics_and_limits() -> None:
    assert webhooks.from_env({}) is None
    f = webhooks.from_env({"PGCAST_SNS_TOPIC_ARNS": f" {m.TOPIC} , arn:x ",
                           "PGCAST_SNS_MAX_AGE": "3600", "PGCAST_SOFT_BOUNCE_LIMIT": "5",
                           "PGCAST_GUARD_MIN": "50", "PGCAST_MAX_BOUNCE_RATE": "0.1",
                           "PGCAST_MAX_COMPLAINT_RATE": "0.002"})
    assert f is not None
    assert f.verifier.topics == frozenset({m.TOPIC, "arn:x"})
    assert (f.verifier.max_age, f.soft_bounce_limit, f.guard_min, f.max_bounce_rate,
            f.max_complaint_rate) == (3600, 5, 50, 0.1, 0.002)
    d = webhooks.from_env({"PGCAST_SNS_TOPIC_ARNS": m.TOPIC})
    assert d is not None
    assert (d.verifier.max_age, d.soft_bounce_limit, d.guard_min, d.max_bounce_rate,
            d.max_complaint_rate) == (24 * 3600, 3, 200, 0.05, 0.001)
    with pytest.raises(webhooks.errors.ConfigError):
        webhooks.from_env({"PGCAST_SNS_TOPIC_ARNS": m.TOPIC, "PGCAST_MAX_BOUNCE_RATE": "5"})


def test_out_of_order_events_keep_the_strongest_outcome(hook: Hook, conn: Conn) -> None:
    bid, rows = sending(conn)
    t0 = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    r0, r1 = rows[0], rows[1]

    def post(kind: str, row: dict[str, Any], minutes: int, **kw: Any) -> None:
        ev = m.ses_event(kind, row["email"], broadcast=bid, contact=row["contact_id"],
                         at=t0 + dt.timedelta(minutes=minutes), **kw)
        assert hook.post(m.notification(ev)).json()["outcome"] == "applied"

    # a complaint, then (late) the delivery and a hard bounce of the same message
    post("Complaint", r0, 10)
    post("Delivery", r0, 1)
    post("Bounce", r0, 5)
    c = contact(conn, r0["contact_id"])
    assert (c["suppressed_reason"], c["unsubscribed_at"] is not None) == ("complaint", True)
    rec = recipient(conn, bid, r0["contact_id"])
    assert None not in (rec["delivered_at"], rec["bounced_at"], rec["complained_at"])
    # a hard bounce stays a hard bounce whatever soft bounce or delivery arrives after it
    post("Bounce", r1, 5)
    post("Bounce", r1, 6, bounce_type="Transient")
    post("Delivery", r1, 7)
    c1 = contact(conn, r1["contact_id"])
    assert (c1["suppressed_reason"], c1["unsubscribed_at"]) == ("bounce", None)
    assert events(conn, r0["contact_id"]) == [("unsubscribe", "ses"), ("suppress", "ses")]
    assert events(conn, r1["contact_id"]) == [("suppress", "ses")]
    p = assert_feedback_counters_true(conn, bid)
    assert (p["delivered"], p["bounced"], p["complained"]) == (2, 2, 1)


def test_soft_bounces_in_a_row_suppress_and_a_delivery_between_resets(
        hook: Hook, conn: Conn) -> None:
    support.seed_contacts(conn, 2, account=A)
    ids = [r["id"] for r in conn.execute("SELECT id FROM contacts ORDER BY id")]
    t0 = dt.datetime.now(dt.UTC) - dt.timedelta(hours=5)
    bids = []
    for _ in range(5):  # one broadcast per message, as real sends would be
        bids.append(support.new_broadcast(conn, account=A))

    def post(kind: str, cid: int, i: int, minutes: int) -> None:
        email = contact(conn, cid)["email"]
        ev = m.ses_event(kind, email, broadcast=bids[i], contact=cid, bounce_type="Transient",
                         at=t0 + dt.timedelta(minutes=minutes))
        assert hook.post(m.notification(ev)).json()["outcome"] == "applied"

    a, b = ids
    # a: soft, soft, (delivery between), soft, soft: never three in a row
    post("Bounce", a, 0, 0)
    post("Bounce", a, 1, 10)
    post("Delivery", a, 2, 20)
    post("Bounce", a, 3, 30)
    post("Bounce", a, 4, 40)
    ca = contact(conn, a)
    assert (ca["suppressed_at"], ca["soft_bounces"]) == (None, 2)
    # b: soft bounces at 0 and 10; a delivery at 5 arrives late: the run is the one at 10
    post("Bounce", b, 0, 0)
    post("Bounce", b, 1, 10)
    post("Delivery", b, 2, 5)
    assert contact(conn, b)["soft_bounces"] == 1
    post("Bounce", b, 3, 20)
    assert contact(conn, b)["suppressed_at"] is None
    post("Bounce", b, 4, 30)  # 10, 20, 30: three in a row
    cb = contact(conn, b)
    assert (cb["suppressed_reason"], cb["soft_bounces"]) == ("soft_bounce", 3)
    assert events(conn, b) == [("soft_bounce", "ses")] * 4 + [("suppress", "ses")]
    # a soft bounce older than the latest delivery does not count
    post("Delivery", a, 0, 50)
    post("Bounce", a, 1, 45)
    assert contact(conn, a)["soft_bounces"] == 0


def test_untagged_hard_bounce_suppresses_everywhere_untagged_complaint_is_logged(
        hook: Hook, conn: Conn) -> None:
    support.seed_contacts(conn, 2, account=A)
    support.seed_contacts(conn, 2, account="other")
    ev = m.ses_event("Bounce", "USER0@example.com", shape="notificationType")
    assert hook.post(m.notification(ev)).json() == {"outcome": "applied"}
    rows = conn.execute("SELECT account, email, suppressed_reason FROM contacts "
                        "ORDER BY account, email").fetchall()
    assert [(r["account"], r["email"], r["suppressed_reason"]) for r in rows] == [
        (A, "user0@example.com", "bounce"), (A, "user1@example.com", None),
        ("other", "user0@example.com", "bounce"), ("other", "user1@example.com", None)]
    ev = m.ses_event("Complaint", "user1@example.com", shape="notificationType")
    assert hook.post(m.notification(ev)).json() == {"outcome": "logged"}
    ev = m.ses_event("Bounce", "nobody@example.com")
    assert hook.post(m.notification(ev)).json() == {"outcome": "unmatched"}
    assert conn.execute("SELECT count(*) AS n FROM contacts WHERE suppressed_at IS NOT NULL "
                        "OR unsubscribed_at IS NOT NULL").fetchone() == {"n": 2}


def test_tags_of_another_account_or_no_row_fall_back_to_the_address(
        hook: Hook, conn: Conn) -> None:
    bid, rows = sending(conn)
    support.seed_contacts(conn, 1, account="other", start=100)
    other = conn.execute("SELECT id, email FROM contacts WHERE account = 'other'").fetchone()
    assert other is not None
    # a complaint tagged with a broadcast of another account: not applied (untagged complaint)
    ev = m.ses_event("Complaint", other["email"], broadcast=bid, contact=other["id"])
    assert hook.post(m.notification(ev)).json() == {"outcome": "logged"}
    assert contact(conn, other["id"])["suppressed_at"] is None
    assert support.progress(conn, bid)["complained"] == 0


def test_tags_of_a_row_that_does_not_exist_fall_back_to_the_address(
        hook: Hook, conn: Conn) -> None:
    support.seed_contacts(conn, 2, account=A)
    ev = m.ses_event("Bounce", "user1@example.com", broadcast=uuid.uuid4(), contact=1)
    assert hook.post(m.notification(ev)).json() == {"outcome": "applied"}
    rows = conn.execute("SELECT email FROM contacts WHERE suppressed_reason = 'bounce'")
    assert [r["email"] for r in rows] == ["user1@example.com"]


def test_unsuppress_after_a_complaint_keeps_the_unsubscribe(
        hook: Hook, conn: Conn) -> None:
    from pgcast.sql import feedback as sql_feedback

    bid, rows = sending(conn)
    r0 = rows[0]
    ev = m.ses_event("Complaint", r0["email"], broadcast=bid, contact=r0["contact_id"])
    assert hook.post(m.notification(ev)).json() == {"outcome": "applied"}
    out = sql_feedback.unsuppress(conn, A, r0["email"], "sql", {"via": "test"})
    assert out["success"] is True and out["was"] == "complaint"
    c = contact(conn, r0["contact_id"])
    assert c["suppressed_at"] is None and c["unsubscribed_at"] is not None


def test_other_ses_events_and_non_ses_messages_are_seen_and_ignored(
        hook: Hook, conn: Conn) -> None:
    bid, rows = sending(conn)
    ev = m.ses_event("Open", rows[0]["email"], broadcast=bid, contact=rows[0]["contact_id"])
    assert hook.post(m.notification(ev)).json() == {"outcome": "ignored"}
    msg = m.sign({**m.notification({}), "Message": "plain text"})
    assert hook.post(msg).json() == {"outcome": "ignored"}
    assert conn.execute("SELECT count(*) AS n FROM sns_messages").fetchone() == {"n": 2}


def test_old_message_ids_are_pruned_as_new_ones_arrive(hook: Hook, conn: Conn) -> None:
    conn.execute("INSERT INTO sns_messages (message_id, topic_arn, type, sent_at) "
                 "SELECT 'old' || g, 't', 'Notification', now() - interval '3 days' "
                 "FROM generate_series(1, 30) g")
    bid, rows = sending(conn)
    ev = m.ses_event("Delivery", rows[0]["email"], broadcast=bid, contact=rows[0]["contact_id"])
    hook.post(m.notification(ev))
    assert conn.execute("SELECT count(*) AS n FROM sns_messages").fetchone() == {"n": 11}


def test_ses_events_annotate_a_transactional_message_by_its_provider_id(
        conn: Conn, hook: Hook) -> None:
    mid = conn.execute("SELECT pgcast_send_message(%s, 'ann@example.com', 'S', 'T', NULL, "
                       "'shop@example.com', NULL) AS id", (A,)).fetchone()["id"]  # type: ignore[index]
    conn.execute("UPDATE messages SET status = 'sent', provider_message_id = 'ses-msg-1', "
                 "worker = 'w' WHERE id = %s", (mid,))
    for kind in ("Delivery", "Complaint"):
        event = m.ses_event(kind, "ann@example.com")
        event["mail"]["messageId"] = "ses-msg-1"
        event["mail"]["tags"] = {"pgcast_message": [str(mid)]}
        r = hook.post(m.notification(event))
        assert r.status_code == 200 and r.json()["message"] == str(mid), r.text
    row = conn.execute("SELECT * FROM message_status WHERE id = %s", (mid,)).fetchone()
    assert row is not None
    assert row["delivered_at"] and row["complained_at"] and row["feedback_detail"] == "abuse"
    # an event about nothing pgcast sent says nothing about messages
    r = hook.post(m.notification(m.ses_event("Delivery", "bob@example.com")))
    assert r.status_code == 200 and "message" not in r.json()
