"""Amazon SES through boto3's sesv2 client, with its errors classified."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from pgcast.mail import message as mail_message
from pgcast.worker import errors, render, sesconn

# SES error codes that stop the whole account, mapped to the pause reason kept on the broadcast.
ACCOUNT_LEVEL = {
    "SendingPausedException": "sending_paused",
    "AccountSendingPausedException": "sending_paused",
    "AccountSuspendedException": "account_suspended",
    "MailFromDomainNotVerifiedException": "mail_from_not_verified",
    "MailFromDomainNotVerified": "mail_from_not_verified",
    "ConfigurationSetDoesNotExist": "configuration_set",
    "ConfigurationSetSendingPausedException": "configuration_set",
    "NotFoundException": "configuration_set",
    "LimitExceededException": "daily_quota",
}
THROTTLED = {"TooManyRequestsException", "Throttling", "ThrottlingException"}
RECIPIENT = {"MessageRejected", "BadRequestException", "InvalidParameterValue"}
CONNECT_TIMEOUT = 5.0  # seconds
READ_TIMEOUT = 30.0  # seconds: a send answered later than this is an unknown outcome
# Failures that provably happen before the request is sent: the only transient transport
# errors (refused, DNS, connect timeout, the proxy's connect). Not SSLError: botocore raises
# it for a failed handshake and for a TLS error while reading the answer alike.
BEFORE_SEND: tuple[type[BaseException], ...] = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ProxyConnectionError,
    botocore.exceptions.NoCredentialsError,
    ConnectionRefusedError,
)


def classify(exc: Exception, written: int = 1) -> errors.ProviderError:
    """Map a boto3/botocore exception to what the engine must do (`written`: bytes of the
    request the call had written to its connection when it failed)."""
    # the pacer's, before the request left (botocore wraps it when it came from the gate
    # that opens a connection: HTTPClientError)
    kwargs = getattr(exc, "kwargs", None)
    inner = kwargs.get("error") if isinstance(kwargs, dict) else None
    if isinstance(exc, errors.NotCalled) or isinstance(inner, errors.NotCalled):
        return errors.NotCalled(str(inner or exc))
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        text = str(err.get("Message", "")) or str(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if "daily message quota" in text.lower():
            return errors.AccountBlocked("daily_quota", f"{code}: {text}")
        if code in THROTTLED or status == 429:
            return errors.Throttled(f"{code}: {text}")
        if code in ACCOUNT_LEVEL:
            return errors.AccountBlocked(ACCOUNT_LEVEL[code], f"{code}: {text}")
        if code in RECIPIENT:
            return errors.RecipientRejected(f"{code}: {text}")
        if status >= 500:
            return errors.Transient(f"{code or status}: {text}")
        # an unrecognised 4xx: retried a bounded number of times, then failed
        return errors.Transient(f"{code or status}: {text}")
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        # refused by botocore before anything was sent: retrying cannot help
        return errors.RecipientRejected(f"invalid request: {exc}")
    if isinstance(exc, BEFORE_SEND):
        # the connection was never made: nothing was sent, a retry cannot mail twice
        return errors.Transient(f"cannot reach SES: {exc}")
    if written == 0 and not isinstance(exc, botocore.exceptions.ReadTimeoutError):
        # not one byte of the request was written (a connection reset or closed before the
        # first write): SES cannot have it, a retry cannot mail twice
        return errors.Transient(f"nothing was written to SES: {type(exc).__name__}: {exc}")
    # Everything else may have happened after the request left: a read timeout, a
    # connection closed mid-answer, a TLS error (botocore's SSLError covers a failed
    # handshake and an SSLEOFError while reading the answer alike), an exception nobody
    # classified. SES may have accepted the message, and re-sending could mail twice.
    return errors.OutcomeUnknown(f"no answer from SES: {type(exc).__name__}: {exc}")


class SesProvider:
    """Sends through sesv2 send_email (Simple content)."""

    name = "ses"
    blocking = True
    may_have_sent_on_error = True  # the request may have reached SES

    def __init__(self, client: Any, configuration_set: str | None = None,
                 connections: sesconn.Connections | None = None) -> None:
        self.client = client
        self.configuration_set = configuration_set
        # counts the bytes each call writes (and gates new connections, when installed)
        self.connections = connections or sesconn.Connections()
        self._pace: Callable[[], object] | None = None
        # the last moment before a request leaves: serialised and signed, about to be written
        client.meta.events.register("before-send.sesv2.SendEmail", self._before_send)

    def pace_with(self, pace: Callable[[], object]) -> None:
        """Call `pace` on the sending thread right before each SendEmail request leaves (the
        rate limit's pacer: boto3's own work per call is then behind it, not after it). It
        may raise errors.Stopped (its group was stopped while it waited): send() raises it,
        nothing of the request written."""
        self._pace = pace
        self.connections.pace = pace  # a call that waited to open a connection is paced again

    def _before_send(self, **_: Any) -> None:
        if self._pace is not None:
            self._pace()

    @classmethod
    def from_env(cls, max_in_flight: int = 10) -> SesProvider:
        """A client built from boto3's own configuration (AWS_REGION, AWS_ENDPOINT_URL_SESV2...),
        with a connection for each of `max_in_flight` calls at once.

        One client, shared by the engine's provider threads: boto3 clients are thread-safe
        (sessions are not, so the session is used here, once, on this thread)."""
        config = botocore.config.Config(
            # pgcast owns retries: boto3's silent retries (3 in standard mode, 5 in legacy,
            # plus adaptive mode's client-side throttle) would hide throttles from the rate
            # limiter and could re-send a message whose first attempt SES did accept. One
            # attempt, set here explicitly so AWS_MAX_ATTEMPTS/AWS_RETRY_MODE or a profile's
            # retry settings cannot turn retries back on.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            # one pooled connection per call in flight: botocore's default of 10 would make
            # the other calls wait for a connection (and log "connection pool is full")
            max_pool_connections=max_in_flight,
            # keep idle connections' NAT and load-balancer state warm between calls
            tcp_keepalive=True,
        )
        session = boto3.session.Session()
        region = session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
        client = session.client("sesv2", region_name=region, config=config)
        connections = sesconn.Connections()
        sesconn.install(client, connections)  # opened a few at a time, retired when idle
        return cls(client, os.environ.get("PGCAST_SES_CONFIGURATION_SET") or None,
                   connections)

    def connection_counts(self) -> dict[str, int]:
        """Connections opened and retired, and transport failures by cause."""
        return self.connections.counts()

    def send(self, message: render.Message) -> str:
        """One send_email call."""
        body: dict[str, Any] = {}
        if message.text is not None:
            body["Text"] = {"Data": message.text, "Charset": "UTF-8"}
        if message.html is not None:
            body["Html"] = {"Data": message.html, "Charset": "UTF-8"}
        # header values built by mail.message (display names as RFC 2047 data), one line each
        request: dict[str, Any] = {
            "FromEmailAddress": mail_message.unfolded(message.from_address),
            "Destination": {"ToAddresses": [mail_message.unfolded(message.to)]},
            "Content": {"Simple": {
                "Subject": {"Data": mail_message.ses_subject(message.subject),
                            "Charset": "UTF-8"},
                "Body": body,
                "Headers": [{"Name": k, "Value": v} for k, v in message.headers.items()],
            }},
            "EmailTags": email_tags(message),
        }
        if self.configuration_set:
            request["ConfigurationSetName"] = self.configuration_set
        self.connections.begin()
        try:
            answer = self.client.send_email(**request)
            message_id = answer["MessageId"]
        except errors.Stopped:
            raise  # stopped at the wire, after the pacer: nothing was written
        except Exception as exc:
            stopped = _stopped(exc)
            if stopped is not None:
                raise stopped from exc  # stopped at a new connection's second pace
            written = self.connections.written()
            error = classify(exc, written)
            if isinstance(exc, botocore.exceptions.BotoCoreError):  # the transport's failure
                self.connections.failed(isinstance(error, errors.Transient))
            raise error from exc
        return str(message_id)

    def max_send_rate(self) -> float | None:
        """MaxSendRate from sesv2 get_account, else v1 get_send_quota; None when unknown."""
        try:
            quota = self.client.get_account().get("SendQuota", {})
            rate = _usable_rate(quota.get("MaxSendRate"))
            if rate is not None:
                return rate
        except Exception:  # noqa: BLE001 - fall through to v1
            pass
        try:
            # bounded like the send client: a worker must not hang at start on a dead endpoint
            v1 = boto3.session.Session().client(
                "ses", region_name=self.client.meta.region_name,
                config=botocore.config.Config(
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    connect_timeout=CONNECT_TIMEOUT, read_timeout=CONNECT_TIMEOUT))
            return _usable_rate(v1.get_send_quota().get("MaxSendRate"))
        except Exception:  # noqa: BLE001 - the caller falls back to a safe default
            return None


def email_tags(message: render.Message) -> list[dict[str, str]]:
    """The tags SES echoes in every event (mail.tags): the webhook finds the row by them."""
    mid = message.headers.get("X-Pgcast-Message")
    if mid:  # a transactional message: its id, and the caller's own tags
        return [{"Name": "pgcast_message", "Value": mid},
                *({"Name": k, "Value": v} for k, v in message.tags.items())]
    tags = [{"Name": "pgcast_contact", "Value": str(message.contact_id)}]
    broadcast = message.headers.get("X-Pgcast-Broadcast")
    if broadcast:
        tags.insert(0, {"Name": "pgcast_broadcast", "Value": broadcast})
    return tags


def _stopped(exc: BaseException) -> errors.Stopped | None:
    """The errors.Stopped the pacer raised from inside the transport (botocore wraps what a
    connection raises in an HTTPClientError), if that is what `exc` is."""
    inner = getattr(exc, "kwargs", {}).get("error") \
        if isinstance(exc, botocore.exceptions.HTTPClientError) else None
    return inner if isinstance(inner, errors.Stopped) else None


def _usable_rate(raw: Any) -> float | None:
    """A MaxSendRate we can use: a finite positive number, else None."""
    try:
        rate = float(raw)
    except (TypeError, ValueError):
        return None
    return rate if math.isfinite(rate) and rate > 0 else None
