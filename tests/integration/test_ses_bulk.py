"""SesProvider.send_many through real boto3 against moto with SendBulkEmail (tests.motobulk),
the fault proxy in between where a test needs a fault (issue 32): what each entry carries is
what SendEmail carries today, a single message is today's SendEmail request, and a call's
failures become every entry's outcome."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
import pytest

from pgcast.mail import message as mail_message
from pgcast.worker import dispatch, errors, ratelimit, render, ses, sesbulk, sesconn
from tests import faultproxy, support
from tests.integration.test_headers import capturing_ses

SENDER = "news@example.com"


def provider_for(url: str, read_timeout: float = ses.READ_TIMEOUT) -> ses.SesProvider:
    """A provider built like SesProvider.from_env, against `url`."""
    client = boto3.session.Session().client(
        "sesv2", region_name="us-east-1", endpoint_url=url, aws_access_key_id="testing",
        aws_secret_access_key="testing", config=botocore.config.Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=ses.CONNECT_TIMEOUT, read_timeout=read_timeout))
    connections = sesconn.Connections()
    sesconn.install(client, connections)
    return ses.SesProvider(client, None, connections)


def content(html: str | None = "<p>Hi {{ contact.name }}</p>") -> render.Content:
    return render.Content(str(uuid.uuid4()), "default", "Hello {{ contact.name }}",
                          f'"Acme News" <{SENDER}>', "Hi {{ contact.name }}", html)


def batch(n: int, c: render.Content | None = None, start: int = 1) -> list[render.Message]:
    c = c or content()
    return [render.render(c, i, f"user{i}@example.com", f"User {i}")
            for i in range(start, start + n)]


@pytest.fixture
def verified(ses: support.MotoServer) -> support.MotoServer:
    ses.verify(SENDER)
    return ses


@pytest.fixture
def proxy(verified: support.MotoServer) -> Iterator[faultproxy.FaultProxy]:
    with faultproxy.running(verified.url) as p:
        yield p


def simple_request(message: render.Message) -> dict[str, Any]:
    """The SendEmail request today's send() makes for a message."""
    with capturing_ses() as (provider, bodies):
        provider.send(message)
    (request,) = bodies
    assert request["path"] == "/v2/email/outbound-emails"
    return dict(request["body"])


def test_each_entry_carries_what_send_email_carries_today(verified: support.MotoServer
                                                          ) -> None:
    messages = batch(4)
    results = provider_for(verified.url).send_many(messages)
    assert all(isinstance(r, str) for r in results), results
    entries = verified.bulk_entries()
    assert len(entries) == 4 and len({e["call"] for e in entries}) == 1  # one call
    for m, result, entry in zip(messages, results, entries, strict=True):
        today = simple_request(m)
        simple = today["Content"]["Simple"]
        assert entry["to"] == today["Destination"]["ToAddresses"][0]
        assert entry["from"] == today["FromEmailAddress"]
        assert entry["subject"] == simple["Subject"]["Data"]
        assert entry["text"] == simple["Body"]["Text"]["Data"]
        assert entry["html"] == simple["Body"]["Html"]["Data"]
        assert entry["headers"] == {h["Name"]: h["Value"] for h in simple["Headers"]}
        assert entry["tags"] == {t["Name"]: t["Value"] for t in today["EmailTags"]}
        assert (entry["status"], entry["message_id"], entry["missing"]) == (
            "SUCCESS", result, [])
    # each recipient's own List-Unsubscribe link
    assert len({e["headers"]["List-Unsubscribe"] for e in entries}) == 4
    assert sorted(m["id"] for m in verified.messages()) == sorted(map(str, results))


def test_a_message_holding_template_syntax_goes_by_send_email(verified: support.MotoServer
                                                              ) -> None:
    c = content()
    messages = [*batch(2, c), render.render(c, 9, "user9@example.com", "{{evil}} Eve")]
    assert not sesbulk.fits(messages[2])
    results = provider_for(verified.url).send_many(messages)
    assert all(isinstance(r, str) for r in results), results
    assert [e["to"] for e in verified.bulk_entries()] == [m.to for m in messages[:2]]
    sent = {m["id"]: m for m in verified.messages()}
    assert set(sent) == set(results)
    assert "{{evil}}" in sent[str(results[2])]["subject"]  # by SendEmail, as it was


def test_a_single_message_is_todays_send_email_request() -> None:
    message = batch(1)[0]
    with capturing_ses() as (provider, bodies):
        assert provider.send_many([message]) == ["captured-1"]
        provider.send(message)
    one, today = bodies
    assert one["path"] == today["path"] == "/v2/email/outbound-emails"
    assert one["body"] == today["body"]


def test_a_refused_entry_reads_as_the_same_refusal_by_send_email(ses: support.MotoServer
                                                                 ) -> None:
    # moto refuses an unverified sender: per entry in a bulk call, the call by SendEmail
    provider = provider_for(ses.url)
    results = provider.send_many(batch(2))
    with pytest.raises(errors.RecipientRejected) as single:
        provider.send(batch(1, start=5)[0])
    assert [type(r) for r in results] == [errors.RecipientRejected] * 2
    assert {str(r) for r in results} == {str(single.value)}
    assert str(single.value).startswith("MessageRejected: ")


def test_per_entry_faults_map_by_position(verified: support.MotoServer) -> None:
    verified.bulk_faults({"user2@": "MESSAGE_REJECTED", "user3@": "ACCOUNT_THROTTLED",
                          "user4@": "TRANSIENT_FAILURE", "user5@": "ACCOUNT_SENDING_PAUSED"})
    results = provider_for(verified.url).send_many(batch(6))
    kinds = [type(r) for r in results]
    assert kinds == [str, errors.RecipientRejected, errors.Throttled, errors.Transient,
                     errors.AccountBlocked, str]
    assert len(verified.messages()) == 2


def test_a_whole_call_throttle_is_each_entrys_and_the_next_call_goes(
        verified: support.MotoServer, proxy: faultproxy.FaultProxy) -> None:
    proxy.set_rules(faultproxy.bulk_throttled(limit=1))
    provider = provider_for(proxy.url)
    first = provider.send_many(batch(3))
    assert [type(r) for r in first] == [errors.Throttled] * 3
    assert verified.messages() == [] and proxy.injected == 1
    again = provider.send_many(batch(3))
    assert all(isinstance(r, str) for r in again) and len(verified.messages()) == 3


def test_a_read_timeout_of_a_bulk_call_is_unknown_for_each_entry_and_none_is_sent_twice(
        verified: support.MotoServer, proxy: faultproxy.FaultProxy) -> None:
    proxy.set_rules(faultproxy.bulk_answer_lost(delay=2.0))  # SES takes it, answers late
    provider = provider_for(proxy.url, read_timeout=0.5)
    results = provider.send_many(batch(5))
    assert [type(r) for r in results] == [errors.OutcomeUnknown] * 5
    assert "ReadTimeout" in str(results[0])
    assert provider.connection_counts()["unknown_after_write"] == 1  # one call
    time.sleep(2.5)  # the proxy's answer is lost: nothing more can arrive
    delivered = [m["destinations"]["ToAddresses"][0] for m in verified.messages()]
    assert sorted(delivered) == sorted(m.to for m in batch(5))  # each exactly once


def test_without_send_bulk_email_it_falls_back_to_send_email_and_says_so_once(
        caplog: pytest.LogCaptureFixture) -> None:
    plain = support.MotoServer(plain=True)
    try:
        plain.verify(SENDER)
        provider = provider_for(plain.url)
        with caplog.at_level(logging.WARNING, logger="pgcast.worker"):
            first = provider.send_many(batch(3))
            second = provider.send_many(batch(3, start=4))
        assert [type(r) for r in first + second] == [errors.Unsupported] * 6
        assert provider.bulk_max() == 0 and not provider.bulk
        assert [r.message for r in caplog.records].count(
            caplog.records[0].message) == 1 and len(caplog.records) == 1
        assert "SendBulkEmail" in caplog.records[0].message
        assert plain.messages() == []  # nothing was sent: put back, to go by SendEmail
        assert isinstance(provider.send(batch(1)[0]), str)
    finally:
        plain.close()


def test_the_pacer_books_a_bulk_call_once_for_all_its_entries(verified: support.MotoServer
                                                              ) -> None:
    provider = provider_for(verified.url)
    carried: list[int] = []
    provider.pace_with(lambda: carried.append(int(getattr(ratelimit._CALL, "count", 1))))
    provider.send_many(batch(4))
    provider.send(batch(1, start=7)[0])
    # (a call that waited to open a connection passes the pacer again, with the same count)
    assert carried[0] == 4 and carried[-1] == 1 and set(carried) == {4, 1}
    # through the sender: a chunk's messages that go by SendEmail book one message's time each
    c = content()
    chunk = [*batch(1, c, start=10), render.render(c, 20, "user20@example.com", "{{x}}"),
             render.render(c, 21, "user21@example.com", "{{y}}")]
    carried.clear()
    outcomes = dispatch.Sender(provider, dispatch.Retries(), None).paced_many(
        chunk, {}, [], math.inf)
    assert [o.outcome for o in outcomes] == ["sent"] * 3
    assert len(carried) >= 3 and set(carried) == {1}


def test_a_bulk_entry_keeps_a_subject_that_looks_like_encoded_words_as_send_email_does(
        verified: support.MotoServer) -> None:
    c = render.Content(str(uuid.uuid4()), "default", "=?utf-8?q?Hello?= {{ contact.name }}",
                       SENDER, "Hi", None)
    messages = [render.render(c, i, f"user{i}@example.com", f"U{i}") for i in (1, 2)]
    provider_for(verified.url).send_many(messages)
    for m, entry in zip(messages, verified.bulk_entries(), strict=True):
        assert entry["subject"] == mail_message.ses_subject(m.subject) != m.subject
        assert entry["html"] is None
