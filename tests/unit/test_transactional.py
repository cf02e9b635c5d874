"""Transactional messages without a database: the caller's headers and tags, the email one
row makes, and the EmailTags SES gets (issue 26)."""

from __future__ import annotations

import uuid

import pytest

from pgcast.mail import errors, message, transactional, unsubscribe
from pgcast.worker import ses

ROW = {"id": "0b5c4a8e-0000-4000-8000-000000000001", "to_address": "ann@example.com",
       "from_address": "Shop <shop@example.com>", "reply_to": "Help <help@example.com>",
       "subject": "Receipt\r\nBcc: x@example.com", "text_body": "Thanks", "html_body": None,
       "headers": {"X-Entity-Ref-ID": "o1"}, "tags": {"kind": "receipt"}}


def test_compose_builds_headers_from_structured_values() -> None:
    msg = transactional.compose(ROW, 0)
    assert msg.to == "ann@example.com" and msg.from_address == '"Shop" <shop@example.com>'
    assert msg.subject == "Receipt Bcc: x@example.com"  # one line: never a header of its own
    assert msg.headers["Reply-To"] == '"Help" <help@example.com>'
    assert msg.headers[transactional.HEADER] == ROW["id"]
    raw = message.to_rfc5322(msg, "<id@x>").decode()
    assert "\r\nBcc:" not in raw and "X-Entity-Ref-ID: o1" in raw


def test_ses_email_tags_name_the_message_and_carry_the_callers_tags() -> None:
    tags = ses.email_tags(transactional.compose(ROW, 0))
    assert tags == [{"Name": "pgcast_message", "Value": ROW["id"]},
                    {"Name": "kind", "Value": "receipt"}]


@pytest.mark.parametrize("raw", [{"Bcc": "x"}, {"X-Pgcast-Broadcast": "x"}, {"X-SES-Foo": "x"},
                                 {"Subject": "x"}, {"X-A": 1}, ["X-A"],
                                 {f"X-H{i}": "v" for i in range(21)}])
def test_headers_outside_the_allow_list_are_refused(raw: object) -> None:
    with pytest.raises(errors.InvalidValue):
        transactional.headers(raw)


def test_allowed_headers_are_kept_on_one_line() -> None:
    got = transactional.headers({"in-reply-to": "<a@b>", "X-Campaign": "a\r\nBcc: b"})
    assert got == {"In-Reply-To": "<a@b>", "X-Campaign": "a Bcc: b"}


@pytest.mark.parametrize("raw", [{"a b": "c"}, {"a": "c d"}, {"pgcast_x": "y"}, {"a": 1},
                                 {f"t{i}": "v" for i in range(11)}])
def test_bad_tags_are_refused(raw: object) -> None:
    with pytest.raises(errors.InvalidValue):
        transactional.tags(raw)


def test_a_template_renders_with_data_under_the_budget() -> None:
    assert transactional.render_template("Order {{ data.n }}", "Hi {{ data.name }}", None,
                                         {"n": 7, "name": "Ann"}) == ("Order 7", "Hi Ann", None)
    with pytest.raises(errors.RenderError):
        transactional.render_template("x", "{% for i in range(10**9) %}{{ i }}{% endfor %}",
                                      None, {}, timeout_ms=50)


def test_only_a_marketing_message_carries_one_click_unsubscribe() -> None:
    url = "https://mail.example.com/u/tok"
    marketing = transactional.compose({**ROW, "category": "marketing"}, 0, url)
    assert marketing.headers["List-Unsubscribe"] == f"<{url}>"
    assert marketing.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    for category in ("transactional", "confirmation", None):
        msg = transactional.compose({**ROW, "category": category}, 0, url)
        assert "List-Unsubscribe" not in msg.headers
        assert "List-Unsubscribe-Post" not in msg.headers
    with pytest.raises(errors.InvalidValue):  # never a marketing message without the link
        transactional.compose({**ROW, "category": "marketing"}, 0, None)


def test_a_message_token_names_the_message_and_is_read_only_by_the_one_click_route() -> None:
    keys = unsubscribe.Keys(("k" * 32,))
    mid = uuid.uuid4()
    token = keys.message(mid)
    target = keys.read(token, messages=True)
    assert (target.message_id, target.contact_id, target.test) == (mid, 0, False)
    with pytest.raises(unsubscribe.InvalidToken):  # the preference and web pages: refused
        keys.read(token)
    # rotated keys: a later first key still reads it; a stranger's key does not
    assert unsubscribe.Keys(("n" * 32, "k" * 32)).read(token, messages=True).message_id == mid
    with pytest.raises(unsubscribe.InvalidToken):
        unsubscribe.Keys(("s" * 32,)).read(token, messages=True)
    # altered anywhere: refused
    for i in (0, len(token) // 2, len(token) - 1):
        bad = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        with pytest.raises(unsubscribe.InvalidToken):
            keys.read(bad, messages=True)
    # a broadcast's token reads as before, with or without `messages`
    old = keys.make("acme", 42, mid)
    for got in (keys.read(old), keys.read(old, messages=True)):
        assert (got.contact_id, got.broadcast_id, got.message_id) == (42, mid, None)


def test_a_sender_is_parsed_once_per_value_and_a_bad_one_refused_every_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = transactional.validate.sender

    def counting(value: str, field: str = "from") -> tuple[str, str]:
        calls.append(value)
        return real(value, field)

    monkeypatch.setattr(transactional.validate, "sender", counting)
    transactional._sender.cache_clear()
    good = {**ROW, "from_address": "Cached Sender <cached@example.com>"}
    first = transactional.compose(good, 1)
    second = transactional.compose({**good, "id": uuid.uuid4()}, 2)
    assert calls.count("Cached Sender <cached@example.com>") == 1
    assert first.from_address == second.from_address == '"Cached Sender" <cached@example.com>'
    bad = {**ROW, "from_address": "two@example.com, addresses@example.com"}
    for _ in range(2):
        with pytest.raises(errors.InvalidValue):
            transactional.compose(bad, 3)
    assert calls.count("two@example.com, addresses@example.com") == 2
