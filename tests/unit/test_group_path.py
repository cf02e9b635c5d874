"""Issue 32, the null-provider drain's worker CPU: a group's work done a group at a time gives
what the one-at-a-time path gives, message for message and outcome for outcome."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from pgcast.mail import message, unsubscribe
from pgcast.worker import dispatch, providers
from pgcast.worker import errors as perr
from tests.unit.test_skeleton import FILLABLE, KEYS, RECIPIENTS, content, token_of, wire
from tests.unit.test_units import ScriptedProvider, group


@pytest.mark.parametrize("test", [False, True])
def test_tokens_made_a_group_at_a_time_read_back_like_one_at_a_time(test: bool) -> None:
    bid = uuid.uuid4()
    ids = [1, 2, 2**62, 7, 7, 0, 123456789]
    tokens = KEYS.many_maker("acct", str(bid), test)(ids)
    one = KEYS.maker("acct", str(bid), test)(5)
    assert len(tokens) == len(ids) and len(set(tokens)) == len(ids)  # fresh nonce each
    for cid, token in zip(ids, tokens, strict=True):
        assert len(token) == len(one) and "=" not in token
        assert KEYS.read(token) == unsubscribe.Target(cid, bid, test)
    assert KEYS.many_maker("acct", bid)([]) == []


@pytest.mark.parametrize("case", FILLABLE)
def test_a_group_filled_at_once_is_each_message_rendered(
        case: tuple[str, str | None, str | None, dict[str, object]]) -> None:
    c = content(*case)
    made = c.skeleton(c.stand_in())
    assert c.usable(made)
    filled = c.filler(made).fill(RECIPIENTS + RECIPIENTS[:2])
    assert len(filled) == len(RECIPIENTS) + 2
    for (cid, address, name), got in zip(RECIPIENTS + RECIPIENTS[:2], filled, strict=True):
        try:
            expected: message.Message | str = c.render(cid, address, name)
        except Exception as exc:  # noqa: BLE001 - the reason is what must match
            expected = str(exc)
        if isinstance(got, Exception) or isinstance(expected, str):
            assert str(got) == expected
            continue
        again = c.render(cid, address, name, token=token_of(got))
        assert got == again and wire(got) == wire(again)


def slow_phrase(display_name: str, header_name: str) -> str:
    """message.phrase without its fast path (its steps, as written before issue 32's cut)."""
    name = message.one_line(display_name)
    if not name:
        return ""
    if message._needs_encoding(name):
        return message.encode_words(name, header_name)
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


NAMES = ["User 1", "A", "!", "~", "a b", " a", "a ", "a\tb", 'Say "hi"', "back\\slash",
         "=?utf-8?b?x?=", "x=?", "=", "?", "Jürgen", "N" * 499, "N" * 500, "N" * 501,
         "a\r\nBcc: x", "", " ", "#$%&'()*+,-./:;<=>?@[]^_`{|}", "a\x7f", "tab\t"]


@pytest.mark.parametrize("name", NAMES)
def test_a_simple_display_name_takes_the_fast_path_to_the_same_phrase(name: str) -> None:
    assert message.phrase(name, "To") == slow_phrase(name, "To")


def composed_to(address: str, name: str | None) -> tuple[str, str] | str:
    """Content._to as its calls give it (addr_spec, phrase), before issue 32's fast path;
    the error's text when they refuse the address."""
    try:
        spec = message.addr_spec(address)
    except Exception as exc:  # noqa: BLE001 - the reason is what must match
        return str(exc)
    shown = message.phrase(name or "", "To")
    return spec, f"{shown} <{spec}>" if shown else spec


ADDRESSES = ["a@example.com", "Case.Mixed+tag@Example.COM", "two@at@example.com",
             " spaced@example.com ", "üser@example.com", "user@bücher.de", "not an address",
             '"a b"@example.com', "x@y", "a.b-c_d@sub.example.org"]


@pytest.mark.parametrize("address", ADDRESSES)
def test_the_to_header_takes_the_fast_path_to_what_its_calls_give(address: str) -> None:
    for name in [None, *NAMES]:
        try:
            got: tuple[str, str] | str = message.Content._to(address, name)
        except Exception as exc:  # noqa: BLE001 - the reason is what must match
            got = str(exc)
        assert got == composed_to(address, name), (address, name)


def scripts() -> list[list[Any]]:
    return [
        ["m0", perr.Throttled("slow down"), "m2", "m3"],
        ["m0", perr.AccountBlocked("sending_paused", "paused"), "m2"],
        [perr.Transient("503"), perr.Transient("503"), perr.RecipientRejected("no"),
         perr.OutcomeUnknown("timeout"), RuntimeError("boom"), "m5"],
        ["m0", perr.Unsupported("no bulk"), perr.NotCalled("late"), "m3"],
        ["m0", "m1", "m2"],
    ]


def shape(o: dispatch.Outcome) -> tuple[Any, ...]:
    """An outcome without its timing (a retry's backoff is random: its presence counts)."""
    return (o.contact_id, o.outcome, o.message_id, o.error, o.retry_in > 0, o.pause_reason,
            o.seconds is None)


@pytest.mark.parametrize("script", scripts())
def test_a_group_sent_in_order_gets_each_outcome_send_one_gives(script: list[Any]) -> None:
    attempts = {0: 0, 1: 2}
    messages = group(len(script))
    one = dispatch.Sender(ScriptedProvider(script), dispatch.Retries(max_retries=2), None)
    stop: list[dispatch.Outcome] = []
    expected = [one.send_one(m, attempts, stop) for m in messages]
    # a row already decided (a message that could not be built) passes through as it is
    failed = dispatch.cannot_build(99, "bad address")
    many = dispatch.Sender(ScriptedProvider(script), dispatch.Retries(max_retries=2), None)
    got = many.send_in_order([failed, *messages], attempts, [])
    assert got[0] is failed
    assert [shape(o) for o in got[1:]] == [shape(o) for o in expected]
    assert dispatch._calling.stop is None


def test_a_provider_taking_many_a_call_gets_a_group_in_one_and_each_keeps_its_outcome(
        ) -> None:
    null = providers.NullProvider()
    sender = dispatch.Sender(null, dispatch.Retries(), None)
    assert sender.in_one_call
    messages = group(4)
    failed = [dispatch.cannot_build(90 + i, "bad address") for i in range(3)]
    built: list[Any] = [failed[0], messages[0], messages[1], failed[1], messages[2],
                        messages[3], failed[2]]
    got = sender.send_in_order(built, {}, [])
    assert [got[0], got[3], got[6]] == failed and got[0] is failed[0]
    sent = [got[1], got[2], got[4], got[5]]
    assert [o.contact_id for o in sent] == [m.contact_id for m in messages]
    assert {o.outcome for o in sent} == {"sent"} and all(o.seconds is not None for o in sent)
    ids = [o.message_id for o in sent]
    assert len(set(ids)) == 4 and all(i and i.startswith("null-") for i in ids)
    assert null.send(messages[0]) not in ids  # one sequence of ids for both calls
    # nothing built: no call
    assert sender.send_in_order(failed, {}, []) == failed
    # a stopped group: nobody is called
    stop = [dispatch.Outcome(0, "throttled", retry_in=1.0)]
    assert {o.outcome for o in sender.send_in_order(messages, {}, stop)} == {"throttled"}


def test_record_params_of_a_group_are_its_columns() -> None:
    outcomes = [dispatch.Outcome(1, "sent", "m-1"), dispatch.Outcome(2, "retry", None, "503", 2.5),
                dispatch.Outcome(3, "failed", None, 'bad "x" \\ y')]
    got = dispatch.record_params("b", "t", outcomes, 3)
    assert got == {"id": "b", "token": "t", "ids": "{1,2,3}",
                   "outcomes": '{"sent","retry","failed"}',
                   "message_ids": '{"m-1",NULL,NULL}',
                   "errors": '{NULL,"503","bad \\"x\\" \\\\ y"}',
                   "retry_in": "{0.0,2.5,0.0}", "breaker": 3}
    # no retry in the group: its zeros written without a repr each, the same numbers
    sent = dispatch.record_params("b", "t", outcomes[:1] * 3, 0)
    assert sent["retry_in"] == "{0,0,0}"
    empty = dispatch.record_params("b", "t", [], 0)
    assert [empty[k] for k in ("ids", "outcomes", "message_ids", "errors", "retry_in")] == [
        "{}"] * 5
