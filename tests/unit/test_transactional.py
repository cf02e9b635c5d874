"""Transactional messages without a database: the caller's headers and tags, the email one
row makes, and the EmailTags SES gets (issue 26)."""

from __future__ import annotations

import pytest

from pgcast.mail import errors, message, transactional
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
