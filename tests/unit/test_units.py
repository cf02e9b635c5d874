"""Pure logic: query files, validation, error classification, the group sender, backoff."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from pgcast.sql import contacts, errors, queries
from pgcast.worker import dispatch, engine, render, ses
from pgcast.worker import errors as perr

ROOT = Path(__file__).resolve().parents[2]


def test_every_query_named_in_code_exists_and_every_query_is_used() -> None:
    indexed, literals = set(), set()
    for folder in ("worker", "api", "bin", "sql"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            indexed |= set(re.findall(r'QUERIES\["([a-z0-9_]+)"\]', text))
            literals |= set(re.findall(r'"([a-z0-9_]+)"', text))
    assert indexed - set(queries.QUERIES) == set()
    unused = set(queries.QUERIES) - literals
    assert unused == set(), f"queries nobody runs: {unused}"


def test_parse_rejects_duplicates_and_strips_descriptions() -> None:
    parsed = queries.parse("-- a --\n-- says a\nSELECT 1\n\n-- b --\n-- says b\nSELECT 2\n")
    assert parsed == {"a": "SELECT 1", "b": "SELECT 2"}
    with pytest.raises(ValueError):
        queries.parse("-- a --\n-- x\nSELECT 1\n-- a --\n-- y\nSELECT 2\n")


def test_validate_merges_duplicates_and_reports_bad_rows() -> None:
    batch = contacts.validate([(2, "A@Example.com", "Ann", ["x"], {"plan": "a", "city": "Oslo"}),
                               (3, "bad", None, []),
                               (4, "a@example.com", "", ["y", "y", " z "], {"plan": "b"}),
                               (5, 42, None, None), (6, "c@example.com", None, [""])])
    # a later row's empty cell keeps the earlier value, as the upsert keeps a stored one
    assert batch.rows == [{"where": 4, "email": "a@example.com", "name": "Ann",
                           "tags": ["y", "z"], "attributes": {"plan": "b", "city": "Oslo"}}]
    assert batch.merged == 1
    assert [(r.where, r.email) for r in batch.rejected] == [(3, "bad"), (5, "42"),
                                                            (6, "c@example.com")]


def test_validate_with_replace_keeps_the_last_duplicate_whole() -> None:
    batch = contacts.validate([(2, "a@example.com", "Ann", ["x"], {"plan": "a"}),
                               (3, "a@example.com", None, [], {})], replace=True)
    assert batch.rows == [{"where": 3, "email": "a@example.com", "name": "", "tags": [],
                           "attributes": {}}]
    assert batch.merged == 1


def test_validate_reports_normalised_addresses() -> None:
    batch = contacts.validate([(2, " Ann@Example.COM ", None, []), (3, "b@example.com", None, [])])
    assert [(n.where, n.given, n.stored) for n in batch.normalised] == [
        (2, "Ann@Example.COM", "Ann@example.com")]


def test_read_csv_requires_an_email_column(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("name,tags\nAnn,\n")
    with pytest.raises(errors.InvalidInput):
        contacts.read_csv(f)


def client_error(code: str, status: int, message: str = "m") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": message},
         "ResponseMetadata": {"HTTPStatusCode": status}}, "SendEmail")


@pytest.mark.parametrize(("exc", "kind", "reason"), [
    (client_error("TooManyRequestsException", 429), perr.Throttled, None),
    (client_error("Throttling", 400, "Maximum sending rate exceeded."), perr.Throttled, None),
    (client_error("Throttling", 400, "Daily message quota exceeded."), perr.AccountBlocked,
     "daily_quota"),
    (client_error("SendingPausedException", 400), perr.AccountBlocked, "sending_paused"),
    (client_error("AccountSuspendedException", 400), perr.AccountBlocked, "account_suspended"),
    (client_error("MailFromDomainNotVerifiedException", 400), perr.AccountBlocked,
     "mail_from_not_verified"),
    (client_error("MessageRejected", 400), perr.RecipientRejected, None),
    (client_error("BadRequestException", 400), perr.RecipientRejected, None),
    (client_error("InternalFailure", 500), perr.Transient, None),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), perr.Transient, None),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), perr.OutcomeUnknown, None),
])
def test_ses_errors_are_classified(exc: Exception, kind: type, reason: str | None) -> None:
    got = ses.classify(exc)
    assert isinstance(got, kind)
    if reason:
        assert isinstance(got, perr.AccountBlocked) and got.reason == reason


class ScriptedProvider:
    """Answers each send from a script of results or exceptions (unit ring only)."""

    name = "scripted"
    blocking = False

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.sent: list[str] = []

    def send(self, message: render.Message) -> str:
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        self.sent.append(message.to)
        return str(step)

    def max_send_rate(self) -> float | None:
        return None


def group(n: int) -> list[render.Message]:
    content = render.Content(str(uuid.uuid4()), "a", "S", "f@example.com", "t", None)
    return [render.render(content, i, f"u{i}@example.com", None) for i in range(n)]


def outcomes_of(script: list[Any], attempts: dict[int, int] | None = None,
                max_retries: int = 2) -> list[tuple[str, str | None]]:
    sender = dispatch.Sender(ScriptedProvider(script), dispatch.Retries(max_retries=max_retries),
                             None)
    stop: list[dispatch.Outcome] = []
    result = [sender.send_one(m, attempts or {}, stop) for m in group(len(script))]
    return [(o.outcome, o.pause_reason) for o in result]


def test_throttle_stops_the_group_without_counting_attempts() -> None:
    got = outcomes_of(["m0", perr.Throttled("slow down"), "m2", "m3"])
    assert got == [("sent", None), ("throttled", None), ("throttled", None), ("throttled", None)]


def test_account_trouble_releases_the_rest_and_asks_for_a_pause() -> None:
    got = outcomes_of(["m0", perr.AccountBlocked("sending_paused", "paused"), "m2"])
    assert got == [("sent", None), ("release", "sending_paused"), ("release", None)]


def test_transient_retries_until_max_retries_then_fails() -> None:
    script = [perr.Transient("503"), perr.Transient("503"), perr.RecipientRejected("no"),
              perr.OutcomeUnknown("timeout")]
    got = outcomes_of(script, attempts={0: 0, 1: 2})
    assert [g[0] for g in got] == ["retry", "failed", "failed", "unknown"]


def test_backoff_grows_and_is_capped_with_jitter() -> None:
    for attempt, top in ((1, 2.0), (2, 4.0), (3, 8.0), (10, 30.0)):
        for _ in range(50):
            d = dispatch.backoff(attempt, 2.0, 30.0)
            assert top / 2 <= d <= top


def test_halted_epochs() -> None:
    state = engine.State()
    bid = uuid.uuid4()
    assert not state.is_halted(bid, 1)
    state.halted[bid] = 1  # paused at epoch 1
    assert state.is_halted(bid, 1) and not state.is_halted(bid, 2)
    state.halted[bid] = engine.NEVER  # cancelled
    assert state.is_halted(bid, 99)



class WireProvider:
    """Passes each call through the wire gate after its pace (as ses's before-send hook
    does); counts what left (unit ring only)."""

    name = "wire"
    blocking = False

    def __init__(self, pace: Any) -> None:
        self.left: list[str] = []
        self.gate = dispatch.at_the_wire(pace)

    def send(self, message: render.Message) -> str:
        self.gate()
        self.left.append(message.to)
        return "m"

    def max_send_rate(self) -> float | None:
        return None


@pytest.mark.parametrize("refusal", [
    dispatch.Outcome(0, "release"),  # what an account-level refusal leaves in the stop list
    dispatch.Outcome(0, "throttled", retry_in=1.5)])
def test_a_call_stopped_at_the_wire_is_put_back_like_one_stopped_before_the_pacer(
        refusal: dispatch.Outcome) -> None:
    stop: list[dispatch.Outcome] = []
    # the call passes the check before the pacer; the refusal comes back while it waits
    provider = WireProvider(lambda: stop.append(refusal))
    sender = dispatch.Sender(provider, dispatch.Retries(), None)
    got = sender.send_one(group(1)[0], {}, stop)
    assert provider.left == []
    before = sender.send_one(group(1)[0], {}, stop)  # the same call stopped before the pacer
    assert (got.outcome, got.retry_in, got.error, got.seconds) == (
        before.outcome, before.retry_in, before.error, before.seconds) == (
        refusal.outcome, refusal.retry_in, None, None)
    assert dispatch._calling.stop is None  # nothing left on the thread for the next call


def test_the_wire_gate_lets_a_call_of_a_group_not_stopped_go() -> None:
    provider = WireProvider(lambda: None)
    sender = dispatch.Sender(provider, dispatch.Retries(), None)
    assert sender.send_one(group(1)[0], {}, []).outcome == "sent"
    provider.gate()  # outside any call: nothing to stop
    assert len(provider.left) == 1


def test_ses_sees_a_stop_raised_inside_the_transport() -> None:
    stopped = perr.Stopped("stopped")
    late = perr.NotCalled("too late")
    assert ses.from_pacer(botocore.exceptions.HTTPClientError(error=stopped)) is stopped
    assert ses.from_pacer(botocore.exceptions.HTTPClientError(error=late)) is late
    assert ses.from_pacer(stopped) is stopped and ses.from_pacer(late) is late
    assert ses.from_pacer(botocore.exceptions.HTTPClientError(error=OSError("reset"))) is None
    assert ses.from_pacer(OSError("reset")) is None
