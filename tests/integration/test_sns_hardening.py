"""Issue 23 item 8: /webhooks/ses says nothing before the signature verifies, fetches only
real SNS certificates, caches failures, can require SignatureVersion 2, bounds JSON depth."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgcast.api import sns, webhooks
from tests import snsmessages as m
from tests.integration import test_api_helpers as h
from tests.integration import test_feedback_webhook as fw

Conn = psycopg.Connection[dict[str, Any]]
DEEP = 100_000  # levels of nesting: past Python's recursion limit


@pytest.fixture
def hook(db_url: str) -> Iterator[fw.Hook]:
    fetcher = m.Fetcher()
    with h.client(db_url) as api:
        api.app.state.feedback = fw.feedback(fetcher)
        yield fw.Hook(api, fetcher)


def _event(conn: Conn) -> dict[str, Any]:
    bid, rows = fw.sending(conn, 1)
    return m.ses_event("Bounce", rows[0]["email"], broadcast=bid, contact=rows[0]["contact_id"])


def test_every_refusal_before_the_signature_verifies_is_the_same_answer(
        hook: fw.Hook, conn: Conn) -> None:
    ev = _event(conn)
    good = m.notification(ev)
    cases = [
        m.notification(ev, topic=m.TOPIC + "-other"),  # signed, but not our topic
        {**good, "TopicArn": m.TOPIC + "-other"},  # not signed, not our topic
        {**good, "Message": json.dumps({**ev, "x": 1})},  # our topic, forged
        {**good, "Signature": "not base64!"},
        {**good, "SignatureVersion": "3"},
        m.notification(ev, timestamp="2001-01-01T00:00:00.000Z"),
        m.notification(ev, cert_url="https://evil.example/x.pem"),
        {"Type": "Notification"},
    ]
    answers = {(r.status_code, r.text) for r in (hook.post(c) for c in cases)}
    listed = hook.api.post("/webhooks/ses", content=b"[1, 2]")
    raw = hook.api.post("/webhooks/ses", content=b"{not json")
    deep = hook.api.post("/webhooks/ses", content=b"[" * DEEP + b"]" * DEEP)
    answers |= {(r.status_code, r.text) for r in (listed, raw, deep)}
    assert len(answers) == 1, answers
    status, text = answers.pop()
    assert status == 403 and "topic" not in text.lower()
    cid = int(ev["mail"]["tags"]["pgcast_contact"][0])
    assert fw.contact(conn, cid)["suppressed_at"] is None


@pytest.mark.parametrize("url", [
    "https://sns.xx-evil-1.amazonaws.com/SimpleNotificationService-test.pem",
    "https://sns.us-east-9.amazonaws.com/SimpleNotificationService-test.pem",
    "https://sns.amazonaws.com/SimpleNotificationService-test.pem",
    "https://sns.evil.us-east-1.amazonaws.com/SimpleNotificationService-test.pem",
])
def test_a_certificate_outside_the_known_regions_is_never_fetched(
        hook: fw.Hook, conn: Conn, url: str) -> None:
    r = hook.post(m.notification(_event(conn), cert_url=url))
    assert r.status_code == 403
    assert hook.fetcher.urls == []


def test_every_known_region_is_a_real_sns_host() -> None:
    assert "us-east-1" in sns.REGIONS and "eu-west-1" in sns.REGIONS
    for region in sns.REGIONS:
        url = f"https://sns.{region}.amazonaws.com/SimpleNotificationService-a.pem"
        assert sns.sns_url(url, pem=True) == url


class _Down:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, url: str) -> bytes:
        self.calls += 1
        raise OSError("connection refused")


def test_a_failed_certificate_fetch_is_remembered_for_a_minute(
        db_url: str, conn: Conn) -> None:
    down, now = _Down(), [1000.0]
    msg = m.notification(_event(conn))
    with h.client(db_url) as api:
        api.app.state.feedback = webhooks.Feedback(sns.Verifier(
            frozenset({m.TOPIC}), webhooks.DEFAULT_MAX_AGE, fetch=down,
            monotonic=lambda: now[0]))
        hook = fw.Hook(api, m.Fetcher())
        assert [hook.post(msg).status_code for _ in range(5)] == [503] * 5
        assert down.calls == 1
        now[0] += sns.FAILURE_TTL + 1
        assert hook.post(msg).status_code == 503
        assert down.calls == 2


def test_signature_version_2_can_be_required(db_url: str, conn: Conn) -> None:
    env = {"PGCAST_SNS_TOPIC_ARNS": m.TOPIC, "PGCAST_SNS_REQUIRE_V2": "1"}
    f = webhooks.from_env(env)
    assert f is not None and f.verifier.require_v2
    off = webhooks.from_env({"PGCAST_SNS_TOPIC_ARNS": m.TOPIC})
    assert off is not None and not off.verifier.require_v2
    with pytest.raises(webhooks.errors.ConfigError):
        webhooks.from_env({**env, "PGCAST_SNS_REQUIRE_V2": "maybe"})
    fetcher = m.Fetcher()
    ev = _event(conn)
    with h.client(db_url) as api:
        api.app.state.feedback = webhooks.Feedback(sns.Verifier(
            frozenset({m.TOPIC}), webhooks.DEFAULT_MAX_AGE, fetch=fetcher, require_v2=True))
        hook = fw.Hook(api, fetcher)
        assert hook.post(m.notification(ev, version="1")).status_code == 403
        assert fetcher.urls == []
        r = hook.post(m.notification(ev, version="2"))
        assert r.status_code == 200 and r.json()["outcome"] == "applied", r.text


def test_a_deeply_nested_message_is_bad_input_not_an_exception(
        hook: fw.Hook, conn: Conn) -> None:
    msg = m.notification({"eventType": "Bounce"})  # a signed message, then its Message nested
    msg = m.sign({**{k: v for k, v in msg.items() if k not in ("Signature",)},
                  "Message": "[" * DEEP + "]" * DEEP})
    r = hook.post(msg)
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] in ("ignored", "logged", "unknown"), r.text
