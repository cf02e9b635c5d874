"""Amazon SES through boto3's sesv2 client, with its errors classified."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from pgcast.mail import message as mail_message
from pgcast.worker import errors, ratelimit, render, sesbulk, sesconn

log = logging.getLogger("pgcast.worker")

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


# what an endpoint without the operation answers (plain moto: a 404 page; AWS-shaped
# services: UnknownOperationException). Not NotFoundException: SES's missing configuration set
UNKNOWN_OPERATION = {"404", "UnknownOperationException", "UnknownOperation", "InvalidAction"}


def from_pacer(exc: BaseException) -> errors.Stopped | errors.NotCalled | None:
    """The errors.Stopped or errors.NotCalled the pacer raised before the request left, if
    that is what `exc` is: raised by the hook itself, or by the gate that opens a connection
    (botocore wraps what a connection raises in an HTTPClientError)."""
    if isinstance(exc, (errors.Stopped, errors.NotCalled)):
        return exc
    kwargs = getattr(exc, "kwargs", None)
    inner = kwargs.get("error") if isinstance(kwargs, dict) else None
    return inner if isinstance(inner, (errors.Stopped, errors.NotCalled)) else None


def classify(exc: Exception, written: int = 1) -> errors.ProviderError:
    """Map a boto3/botocore exception to what the engine must do (`written`: bytes of the
    request the call had written to its connection when it failed)."""
    paced = from_pacer(exc)
    if isinstance(paced, errors.NotCalled):  # too late for its slot: never left
        return errors.NotCalled(str(paced))
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
                 connections: sesconn.Connections | None = None, bulk: bool = True) -> None:
        self.client = client
        self.configuration_set = configuration_set
        # counts the bytes each call writes (and gates new connections, when installed)
        self.connections = connections or sesconn.Connections()
        self._pace: Callable[[], object] | None = None
        # False: one message per call (PGCAST_SES_BULK=0, or the endpoint has no
        # SendBulkEmail: learnt from its first answer, for the process's life)
        self.bulk = bulk
        self._bulk_lock = threading.Lock()
        # the last moment before a request leaves: serialised and signed, about to be written
        client.meta.events.register("before-send.sesv2.SendEmail", self._before_send)
        client.meta.events.register("before-send.sesv2.SendBulkEmail", self._before_send)

    def pace_with(self, pace: Callable[[], object]) -> None:
        """Call `pace` on the sending thread right before each SendEmail or SendBulkEmail
        request leaves (the rate limit's pacer: boto3's own work per call is then behind it,
        not after it; a bulk call runs inside ratelimit.carrying(its entries)). It may raise
        errors.Stopped (its group was stopped while it waited): the call raises it, nothing
        of the request written."""
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
        bulk = os.environ.get("PGCAST_SES_BULK", "1").strip().lower() not in ("0", "false",
                                                                            "no", "off")
        return cls(client, os.environ.get("PGCAST_SES_CONFIGURATION_SET") or None,
                   connections, bulk)

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
            raise self._failure(exc) from exc
        return str(message_id)

    def _failure(self, exc: Exception) -> errors.ProviderError:
        """What a call's exception means (counted as the transport's failure when it is)."""
        paced = from_pacer(exc)
        if isinstance(paced, errors.Stopped):
            return paced  # stopped at a new connection's second pace: nothing written
        error = classify(exc, self.connections.written())
        if isinstance(exc, botocore.exceptions.BotoCoreError):  # the transport's failure
            self.connections.failed(isinstance(error, errors.Transient))
        return error

    def bulk_max(self) -> int:
        """The most messages one send_many call carries at once (0: one per call)."""
        return sesbulk.MOST if self.bulk else 0

    def send_many(self, messages: Sequence[render.Message]) -> list[str | errors.ProviderError]:
        """The messages of one group (one broadcast: one sender, the same parts), by one
        SendBulkEmail call: a message id or the error, per message, in order.

        A message that does not fit a bulk entry (a part holding `{{`, SES's template
        syntax; a header SES would refuse in one; another sender or other parts than the
        first's) goes by send(), one call each, as does the only one that fits. A refusal
        that stops the group (a throttle, account-level trouble) leaves the later calls
        unmade (errors.Stopped). Never raises."""
        out: list[str | errors.ProviderError | None] = [None] * len(messages)
        fitting = [i for i, m in enumerate(messages) if sesbulk.fits(m)]
        shape = sesbulk.shape(messages[fitting[0]]) if fitting else None
        fits = [i for i in fitting if sesbulk.shape(messages[i]) == shape]
        stop: errors.ProviderError | None = None
        if len(fits) > 1:
            results = self._send_bulk([messages[i] for i in fits]) if self.bulk else \
                _no_bulk(len(fits))
            for i, result in zip(fits, results, strict=True):
                out[i] = result
                if stop is None and isinstance(result, (errors.Throttled,
                                                        errors.AccountBlocked)):
                    stop = result
        for i, m in enumerate(messages):
            if out[i] is not None:
                continue
            if stop is not None:
                out[i] = errors.Stopped(f"not called: its group was stopped ({stop})")
                continue
            try:
                out[i] = self.send(m)
            except errors.ProviderError as exc:
                out[i] = exc
                if isinstance(exc, (errors.Throttled, errors.AccountBlocked)):
                    stop = exc
            except Exception as exc:  # noqa: BLE001 - the caller classifies it as send's
                out[i] = errors.OutcomeUnknown(f"unexpected provider error: "
                                               f"{type(exc).__name__}: {exc}")
        return [r for r in out if r is not None]

    def _send_bulk(self, messages: list[render.Message]) -> list[str | errors.ProviderError]:
        """One SendBulkEmail call: each entry's outcome, by position."""
        request = sesbulk.request(messages, [email_tags(m) for m in messages],
                                  self.configuration_set)
        self.connections.begin()
        try:
            with ratelimit.carrying(len(messages)):
                answer = self.client.send_bulk_email(**request)
        except Exception as exc:  # noqa: BLE001 - every entry's outcome, never the caller's
            if self._unknown_operation(exc):
                return _no_bulk(len(messages))
            error = self._failure(exc)
            return [error] * len(messages)  # a throttle stops the group, unknown is unknown
        results = answer.get("BulkEmailEntryResults")
        if not isinstance(results, list) or len(results) != len(messages):
            # SES answers one result per entry, in order: anything else cannot be mapped
            got = len(results) if isinstance(results, list) else "no"
            error = errors.OutcomeUnknown(f"SendBulkEmail answered {got} results for "
                                          f"{len(messages)} entries")
            return [error] * len(messages)
        return [sesbulk.outcome(r) for r in results]

    def _unknown_operation(self, exc: Exception) -> bool:
        """The endpoint does not serve SendBulkEmail: from now on one message per call (said
        once in the log)."""
        if not isinstance(exc, botocore.exceptions.ClientError):
            return False
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code not in UNKNOWN_OPERATION or status not in (400, 404, 501):
            return False
        with self._bulk_lock:
            if self.bulk:
                self.bulk = False
                log.warning("the SES endpoint does not serve SendBulkEmail (%s %s): sending "
                            "one message per SendEmail call from now on", status, code)
        return True

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


def _no_bulk(n: int) -> list[str | errors.ProviderError]:
    """The outcome of n messages a SendBulkEmail call cannot carry (the endpoint has none):
    put back, never sent, to go by SendEmail."""
    return [errors.Unsupported("not sent: the endpoint has no SendBulkEmail; put back, to go "
                               "by SendEmail") for _ in range(n)]


def _usable_rate(raw: Any) -> float | None:
    """A MaxSendRate we can use: a finite positive number, else None."""
    try:
        rate = float(raw)
    except (TypeError, ValueError):
        return None
    return rate if math.isfinite(rate) and rate > 0 else None
