"""worker.ses.classify and the worker's rate configuration, without a database."""

from __future__ import annotations

import types
from typing import Any

import botocore.exceptions
import pytest

from pgcast.worker import control, engine, errors, render, ses
from pgcast.worker import main as worker_main


def client_error(status: int, code: str, message: str) -> botocore.exceptions.ClientError:
    response: Any = {"Error": {"Code": code, "Message": message},
                     "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(response, "SendEmail")


@pytest.mark.parametrize(("status", "code", "message", "kind", "reason"), [
    (429, "TooManyRequestsException", "Maximum sending rate exceeded.", errors.Throttled, None),
    (400, "Throttling", "Maximum sending rate exceeded.", errors.Throttled, None),
    (429, "", "", errors.Throttled, None),
    (429, "TooManyRequestsException", "Daily message quota exceeded.", errors.AccountBlocked,
     "daily_quota"),
    (400, "Throttling", "Daily message quota exceeded.", errors.AccountBlocked, "daily_quota"),
    (400, "LimitExceededException", "Limit exceeded", errors.AccountBlocked, "daily_quota"),
    (400, "SendingPausedException", "paused", errors.AccountBlocked, "sending_paused"),
    (400, "AccountSuspendedException", "suspended", errors.AccountBlocked, "account_suspended"),
    (400, "MailFromDomainNotVerifiedException", "x", errors.AccountBlocked,
     "mail_from_not_verified"),
    (404, "NotFoundException", "no such configuration set", errors.AccountBlocked,
     "configuration_set"),
    (400, "MessageRejected", "Email address is not verified.", errors.RecipientRejected, None),
    (400, "BadRequestException", "bad", errors.RecipientRejected, None),
    (500, "InternalFailure", "oops", errors.Transient, None),
    (503, "ServiceUnavailable", "", errors.Transient, None),
    (403, "SomethingNew", "?", errors.Transient, None),
])
def test_client_errors(status: int, code: str, message: str, kind: type,
                       reason: str | None) -> None:
    got = ses.classify(client_error(status, code, message))
    assert type(got) is kind
    assert getattr(got, "reason", None) == reason


@pytest.mark.parametrize(("exc", "kind"), [
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), errors.OutcomeUnknown),
    (botocore.exceptions.ConnectionClosedError(endpoint_url="http://x"), errors.OutcomeUnknown),
    (botocore.exceptions.HTTPClientError(error="reset mid-answer"), errors.OutcomeUnknown),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), errors.Transient),
    (botocore.exceptions.ConnectTimeoutError(endpoint_url="http://x"), errors.Transient),
    (botocore.exceptions.ParamValidationError(report="bad header"), errors.RecipientRejected),
    (ConnectionRefusedError(), errors.Transient),
    # a TLS error after the request left (SSLEOFError while reading SES's answer) is an
    # unknown outcome: botocore's SSLError cannot tell it from a failed handshake
    (botocore.exceptions.SSLError(endpoint_url="http://x", error="EOF occurred in violation "
                                  "of protocol (_ssl.c:2427)"), errors.OutcomeUnknown),
    (ConnectionResetError(), errors.OutcomeUnknown),
    (RuntimeError("unclassified"), errors.OutcomeUnknown),
])
def test_transport_errors(exc: Exception, kind: type) -> None:
    assert type(ses.classify(exc)) is kind


class FakeSes:
    """A provider that reports a fixed MaxSendRate."""

    name = "ses"
    blocking = True

    def __init__(self, rate: float | None) -> None:
        self.rate = rate

    def max_send_rate(self) -> float | None:
        """The configured rate."""
        return self.rate


@pytest.mark.parametrize(("env", "message"), [
    ({"PGCAST_RATE": "nan"}, "finite"), ({"PGCAST_RATE": "inf"}, "finite"),
    ({"PGCAST_RATE": "-1"}, ">= 0"), ({"PGCAST_RATE": "fast"}, "number"),
    ({"PGCAST_RATE": "5", "PGCAST_BURST": "0.5"}, ">= 1"),
    ({"PGCAST_RATE": "5", "PGCAST_BURST": "nan"}, "finite"),
])
def test_bad_rate_settings_are_refused_before_touching_the_database(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(errors.ConfigError, match=message):
        worker_main.configure_rate("postgresql://nowhere.invalid/x", FakeSes(14))  # type: ignore[arg-type]


@pytest.mark.parametrize(("rate", "burst"), [(0, 2), (0.85, 2), (12, 2), (60, 3), (500, 25)])
def test_default_burst_is_a_twentieth_of_a_second_at_least_two(rate: float, burst: float) -> None:
    assert worker_main.default_burst(rate) == burst


def test_a_malformed_control_event_is_ignored_not_fatal() -> None:
    state = engine.State()
    for payload in ("x", "[1]", "{}", '{"event": "pause"}', '{"event": "pause", "broadcast": 1}',
                    '{"event": "rate", "bucket": "global", "rate": "NaN"}',
                    '{"event": "rate", "bucket": "global"}'):
        control.apply(state, payload)
    control.apply(state, '{"event": "rate", "bucket": "global", "rate": 7}')
    assert state.rates == {"global": 7.0} and not state.halted


class AnswerWithoutId:
    """An SES-compatible answer that lacks MessageId."""

    # botocore's event system, as far as the provider uses it (registering a hook)
    meta = types.SimpleNamespace(events=types.SimpleNamespace(register=lambda *a, **k: None))

    def send_email(self, **request: Any) -> dict[str, Any]:
        """Accepts and answers without an id."""
        return {}


def test_an_answer_without_a_message_id_is_an_unknown_outcome_not_a_crash() -> None:
    message = render.Message(1, "a@example.com", "news@example.com", "Hi", "text", None)
    with pytest.raises(errors.OutcomeUnknown):
        ses.SesProvider(AnswerWithoutId()).send(message)
