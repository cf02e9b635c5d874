"""SendBulkEmail's pieces without a network (issue 32): the per-entry outcome map, the request
shape, what fits an entry, the chunks, the sender's mapping of one call's outcomes, and the
pacer's accounting of a call that carries many messages."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import uuid
from typing import Any

import pytest

from pgcast.worker import dispatch, ratelimit, render, ses, sesbulk
from pgcast.worker import errors as perr


def content(text: str | None = "Hi {{ contact.name }}", html: str | None = "<p>Hi</p>",
            subject: str = "Hello") -> render.Content:
    return render.Content(str(uuid.uuid4()), "a", subject, '"Acme" <news@example.com>', text,
                          html)


def messages(n: int, c: render.Content | None = None) -> list[render.Message]:
    c = c or content()
    return [render.render(c, i, f"u{i}@example.com", f"User {i}") for i in range(1, n + 1)]


@pytest.mark.parametrize(("result", "kind", "detail"), [
    ({"Status": "SUCCESS", "MessageId": "m-1"}, str, "m-1"),
    ({"Status": "SUCCESS"}, perr.OutcomeUnknown, None),
    ({"Status": "MESSAGE_REJECTED", "Error": "suppressed"}, perr.RecipientRejected,
     "MessageRejected: suppressed"),
    ({"Status": "INVALID_PARAMETER", "Error": "bad"}, perr.RecipientRejected,
     "InvalidParameterValue: bad"),
    ({"Status": "ACCOUNT_THROTTLED", "Error": "slow"}, perr.Throttled, None),
    ({"Status": "ACCOUNT_SUSPENDED"}, perr.AccountBlocked, "account_suspended"),
    ({"Status": "ACCOUNT_SENDING_PAUSED"}, perr.AccountBlocked, "sending_paused"),
    ({"Status": "ACCOUNT_DAILY_QUOTA_EXCEEDED"}, perr.AccountBlocked, "daily_quota"),
    ({"Status": "MAIL_FROM_DOMAIN_NOT_VERIFIED"}, perr.AccountBlocked, "mail_from_not_verified"),
    ({"Status": "CONFIGURATION_SET_NOT_FOUND"}, perr.AccountBlocked, "configuration_set"),
    ({"Status": "CONFIGURATION_SET_SENDING_PAUSED"}, perr.AccountBlocked, "configuration_set"),
    ({"Status": "TRANSIENT_FAILURE"}, perr.Transient, None),
    ({"Status": "FAILED"}, perr.Transient, None),
    ({"Status": "TEMPLATE_NOT_FOUND"}, perr.Transient, None),
    ({"Status": "SOMETHING_NEW"}, perr.Transient, None),
    ("garbage", perr.OutcomeUnknown, None),
])
def test_each_entry_status_maps_to_what_the_engine_must_do(result: Any, kind: type,
                                                           detail: str | None) -> None:
    got = sesbulk.outcome(result)
    assert isinstance(got, kind)
    if kind is str:
        assert got == detail
    elif kind is perr.AccountBlocked:
        assert isinstance(got, perr.AccountBlocked) and got.reason == detail
    elif detail is not None:
        assert str(got) == detail


def test_the_bulk_request_sends_shared_values_once_and_each_entry_what_differs() -> None:
    batch = messages(3)
    request = sesbulk.request(batch, [ses.email_tags(m) for m in batch], "my-set")
    assert request["ConfigurationSetName"] == "my-set"
    assert request["FromEmailAddress"] == batch[0].from_address
    template = request["DefaultContent"]["Template"]
    assert template["TemplateContent"] == {"Subject": "{{subject}}", "Text": "{{text}}",
                                           "Html": "{{html}}"}
    shared = {h["Name"]: h["Value"] for h in template["Headers"]}
    assert "List-Unsubscribe" not in shared  # each recipient's own link
    assert shared == {k: v for k, v in batch[0].headers.items() if k != "List-Unsubscribe"}
    assert request["DefaultEmailTags"] == [{"Name": "pgcast_broadcast",
                                            "Value": batch[0].headers["X-Pgcast-Broadcast"]}]
    for m, entry in zip(batch, request["BulkEmailEntries"], strict=True):
        assert entry["Destination"] == {"ToAddresses": [m.to]}
        assert entry["ReplacementHeaders"] == [{"Name": "List-Unsubscribe",
                                                "Value": m.headers["List-Unsubscribe"]}]
        assert entry["ReplacementTags"] == [{"Name": "pgcast_contact",
                                             "Value": str(m.contact_id)}]
        data = json.loads(entry["ReplacementEmailContent"]["ReplacementTemplate"][
            "ReplacementTemplateData"])
        assert data == {"subject": m.subject, "text": m.text, "html": m.html}
    # every header and tag of every message is in its entry or shared: nothing lost
    for m, entry in zip(batch, request["BulkEmailEntries"], strict=True):
        headers = {**shared, **{h["Name"]: h["Value"] for h in entry["ReplacementHeaders"]}}
        assert headers == m.headers
        tags = request["DefaultEmailTags"] + entry["ReplacementTags"]
        assert sorted(t["Name"] for t in tags) == sorted(t["Name"] for t in ses.email_tags(m))


def test_a_text_only_broadcast_has_no_html_part_and_no_configuration_set() -> None:
    batch = messages(2, content(html=None))
    request = sesbulk.request(batch, [ses.email_tags(m) for m in batch], None)
    assert request["DefaultContent"]["Template"]["TemplateContent"] == {
        "Subject": "{{subject}}", "Text": "{{text}}"}
    assert "ConfigurationSetName" not in request


def test_what_does_not_fit_a_bulk_entry_goes_by_itself() -> None:
    plain = messages(1)[0]
    assert sesbulk.fits(plain)
    # a contact's own data can hold SES's template syntax
    assert not sesbulk.fits(render.render(content(), 1, "u1@example.com", "{{evil}}"))
    assert not sesbulk.fits(messages(1, content(subject="{{ '{{' }}x}}"))[0])
    odd = messages(1)[0]
    odd.headers["X-Odd"] = "caf\u00e9"  # not printable ASCII: SES refuses it in an entry
    assert not sesbulk.fits(odd)
    transactional = messages(1)[0]
    transactional.headers["X-Pgcast-Message"] = "m1"
    assert not sesbulk.fits(transactional)
    assert sesbulk.shape(plain) != sesbulk.shape(messages(1, content(html=None))[0])


def test_chunks_respect_the_count_and_the_bytes() -> None:
    batch = messages(7)
    rows = list(range(7))
    assert dispatch.chunks(rows, batch, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    one = dispatch.message_bytes(batch[0])
    assert dispatch.chunks(rows, batch, 50, most_bytes=2 * one + one // 2) == [
        [0, 1], [2, 3], [4, 5], [6]]
    assert dispatch.chunks(rows[:2], batch[:2], 50, most_bytes=1) == [[0], [1]]


class BulkProvider:
    """Answers each send_many from a script of per-message results (unit ring only)."""

    name = "bulk"
    blocking = True
    may_have_sent_on_error = True

    def __init__(self, script: list[list[Any]], most: int = 50) -> None:
        self.script = list(script)
        self.calls: list[list[int]] = []
        self.singles: list[int] = []
        self.most = most

    def bulk_max(self) -> int:
        return self.most

    def send_many(self, batch: list[render.Message]) -> list[Any]:
        self.calls.append([m.contact_id for m in batch])
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return list(step)

    def send(self, message: render.Message) -> str:
        self.singles.append(message.contact_id)
        return f"single-{message.contact_id}"

    def max_send_rate(self) -> float | None:
        return None


def test_one_calls_outcomes_map_per_message_and_a_throttle_counts_once() -> None:
    throttled = perr.Throttled("TooManyRequestsException: slow")
    provider = BulkProvider([["m1", perr.RecipientRejected("MessageRejected: no"), throttled,
                              perr.Throttled("TooManyRequestsException: slow"),
                              perr.Transient("TRANSIENT_FAILURE: x"),
                              perr.OutcomeUnknown("?"),
                              perr.AccountBlocked("sending_paused", "paused"),
                              perr.Unsupported("not served")]])
    sender = dispatch.Sender(provider, dispatch.Retries(), None)
    stop: list[dispatch.Outcome] = []
    got = sender.send_many(messages(8), {}, stop)
    assert [o.outcome for o in got] == ["sent", "failed", "throttled", "throttled", "retry",
                                        "unknown", "release", "release"]
    assert got[0].message_id == "m1" and got[1].error == "MessageRejected: no"
    assert got[2].retry_in == got[3].retry_in and sender._throttles == 0  # a sent one reset it
    assert got[6].pause_reason == "sending_paused" and got[7].pause_reason is None
    assert [o.outcome for o in stop] == ["throttled", "release"]
    assert all(o.seconds is not None for o in got)
    # the group is stopped: its next chunk is not called
    later = sender.send_many(messages(3), {}, stop)
    assert [o.outcome for o in later] == ["throttled"] * 3 and len(provider.calls) == 1


def test_an_exception_of_the_whole_call_is_every_entrys_outcome() -> None:
    provider = BulkProvider([RuntimeError("boom")])
    sender = dispatch.Sender(provider, dispatch.Retries(), None)
    got = sender.send_many(messages(4), {}, [])
    assert {o.outcome for o in got} == {"unknown"}  # it may have left: never re-sent blindly
    stopped = BulkProvider([[perr.Stopped("stopped")] * 2])
    sender = dispatch.Sender(stopped, dispatch.Retries(), None)
    stop = [dispatch.Outcome(0, "throttled", retry_in=2.0)]
    got = sender.send_many(messages(2), {}, [])
    assert [(o.outcome, o.seconds) for o in got] == [("release", None)] * 2
    assert sender.send_many(messages(2), {}, stop)[0].retry_in == 2.0


def test_a_group_goes_in_chunks_one_executor_call_each_and_each_row_is_answered() -> None:
    provider = BulkProvider([[f"m{i}" for i in range(1, 4)], [f"m{i}" for i in range(4, 7)]],
                            most=3)
    executor = concurrent.futures.ThreadPoolExecutor(4)
    sender = dispatch.Sender(provider, dispatch.Retries(), executor)
    answered: list[int] = []

    async def run() -> list[dispatch.Outcome]:
        handed = [dispatch.Recipient(i, f"u{i}@example.com", None) for i in range(1, 8)]
        return await sender.send_group(content(), handed, {},
                                       each=lambda f: answered.append(f.result().contact_id))

    try:
        got = asyncio.run(run())
    finally:
        executor.shutdown()
    assert provider.calls == [[1, 2, 3], [4, 5, 6]] and provider.singles == [7]
    assert [o.message_id for o in got] == ["m1", "m2", "m3", "m4", "m5", "m6", "single-7"]
    assert sorted(answered) == list(range(1, 8))


def test_the_chunk_size_is_the_providers_and_at_most_the_burst() -> None:
    sender = dispatch.Sender(BulkProvider([]), dispatch.Retries(), None)
    assert sender._chunk_max(None) == 50
    assert sender._chunk_max(ratelimit.Slots(0.0, 0.01, 0.0, burst=10)) == 10
    assert sender._chunk_max(ratelimit.Slots(0.0, 0.01, 0.0)) == 50
    sender.provider = BulkProvider([], most=0)  # fell back to one message per call
    assert sender._chunk_max(None) == 0
    # a provider without send_many (null, file): one message per call, as always
    assert dispatch.Sender(ScriptedOne(), dispatch.Retries(), None)._chunk_max(None) == 1


class ScriptedOne:
    """A provider of one message per call (unit ring only)."""

    name = "one"
    blocking = True

    def send(self, message: render.Message) -> str:
        return "m"

    def max_send_rate(self) -> float | None:
        return None


def test_the_schedules_slots_know_the_burst() -> None:
    schedule = ratelimit.Schedule()
    slots = schedule.slots(0.0, 0.01, 100.0, 100.0, 0.09)  # rate 100, burst 10
    assert slots is not None and slots.burst == 10
    unlimited = schedule.slots(0.0, 0.01, 100.0, 100.0)
    assert unlimited is not None and unlimited.burst == math.inf


def test_a_call_carrying_n_messages_books_n_messages_time(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    clock = [50.0]
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: clock[0])
    pacer = ratelimit.Pacer(lambda: 100.0)
    with ratelimit.carrying(50):
        assert pacer.delay() == 0.0
    assert pacer.delay() == pytest.approx(0.5)  # the next call waits for the 50's time
    assert pacer.delay(10) == pytest.approx(0.51)
    assert pacer.delay() == pytest.approx(0.61)
    # with a wire slot a chunk waits for its first message's slot, whatever it carries
    with ratelimit.on_this_thread(ratelimit.Slot(at=50.3, since=50.0)), \
            ratelimit.carrying(10):
        assert pacer.delay() == pytest.approx(0.3)


def max_in_window(times: list[float], width: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.mark.parametrize(("rate", "burst"), [(100.0, 10.0), (20.0, 50.0), (500.0, 100.0)])
def test_chunks_leaving_at_their_first_slot_keep_any_second_within_rate_plus_burst(
        rate: float, burst: float) -> None:
    """Grants of up to `burst` tokens book consecutive slots 1 / rate apart; each group goes
    in chunks of at most min(50, burst) that leave at their first message's slot, all its
    messages at once: no second holds more than rate + burst messages."""
    sender = dispatch.Sender(BulkProvider([]), dispatch.Retries(), None)
    at, departures = 0.0, []
    for grant in [int(burst), 3, int(burst), 1, int(burst), 7] * 20:
        slots = ratelimit.Slots(at, 1 / rate, at, burst=burst)
        most = sender._chunk_max(slots)
        for chunk in dispatch.chunks(list(range(grant)), messages(grant), most):
            departures += [slots.at(chunk[0]).at] * len(chunk)
        at += grant / rate
    assert max_in_window(sorted(departures), 1.0) <= rate + burst


@pytest.mark.parametrize("text", ["plain text " * 200, "caf\u00e9 " * 300, "\U0001f600" * 500,
                                  'quotes " and \\ backslashes ' * 50])
def test_a_messages_byte_estimate_bounds_its_entry_in_the_request(text: str) -> None:
    batch = messages(2, content(text=text, html=f"<p>{text}</p>"))
    request = sesbulk.request(batch, [ses.email_tags(m) for m in batch], None)
    body = json.dumps(request)  # as botocore writes it: ASCII, escaped
    shared = len(json.dumps({k: v for k, v in request.items() if k != "BulkEmailEntries"}))
    assert len(body) - shared <= sum(dispatch.message_bytes(m) for m in batch)
