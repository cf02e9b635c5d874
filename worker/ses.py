"""Amazon SES through boto3's sesv2 client, with its errors classified."""

from __future__ import annotations

import os
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from worker import errors, render

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


def classify(exc: Exception) -> errors.ProviderError:
    """Map a boto3/botocore exception to what the engine must do."""
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
    if isinstance(exc, botocore.exceptions.ReadTimeoutError | botocore.exceptions.ConnectionClosedError):
        # the request left; SES may have accepted it. Re-sending could mail twice.
        return errors.OutcomeUnknown(f"no answer from SES: {exc}")
    if isinstance(exc, botocore.exceptions.BotoCoreError | OSError):
        # connect failures: nothing was sent
        return errors.Transient(f"cannot reach SES: {exc}")
    return errors.Transient(f"{type(exc).__name__}: {exc}")


class SesProvider:
    """Sends through sesv2 send_email (Simple content)."""

    name = "ses"
    blocking = True

    def __init__(self, client: Any, configuration_set: str | None = None) -> None:
        self.client = client
        self.configuration_set = configuration_set

    @classmethod
    def from_env(cls) -> SesProvider:
        """A client built from boto3's own configuration (AWS_REGION, AWS_ENDPOINT_URL_SESV2...)."""
        config = botocore.config.Config(
            # pgcast owns retries: boto3's silent retries would hide throttles from the rate
            # limiter and could re-send a message whose first attempt SES did accept.
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=int(os.environ.get("PGCAST_SES_POOL", "20")),
        )
        session = boto3.session.Session()
        region = session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
        client = session.client("sesv2", region_name=region, config=config)
        return cls(client, os.environ.get("PGCAST_SES_CONFIGURATION_SET") or None)

    def send(self, message: render.Message) -> str:
        """One send_email call."""
        body: dict[str, Any] = {}
        if message.text is not None:
            body["Text"] = {"Data": message.text, "Charset": "UTF-8"}
        if message.html is not None:
            body["Html"] = {"Data": message.html, "Charset": "UTF-8"}
        request: dict[str, Any] = {
            "FromEmailAddress": message.from_address,
            "Destination": {"ToAddresses": [message.to]},
            "Content": {"Simple": {
                "Subject": {"Data": message.subject, "Charset": "UTF-8"},
                "Body": body,
                "Headers": [{"Name": k, "Value": v} for k, v in message.headers.items()],
            }},
        }
        if self.configuration_set:
            request["ConfigurationSetName"] = self.configuration_set
        try:
            answer = self.client.send_email(**request)
        except Exception as exc:
            raise classify(exc) from exc
        return str(answer["MessageId"])

    def max_send_rate(self) -> float | None:
        """MaxSendRate from sesv2 get_account, else v1 get_send_quota; None when unknown."""
        try:
            quota = self.client.get_account().get("SendQuota", {})
            if quota.get("MaxSendRate"):
                return float(quota["MaxSendRate"])
        except Exception:  # noqa: BLE001 - fall through to v1
            pass
        try:
            v1 = boto3.session.Session().client(
                "ses", region_name=self.client.meta.region_name,
                config=botocore.config.Config(retries={"total_max_attempts": 1}))
            return float(v1.get_send_quota()["MaxSendRate"])
        except Exception:  # noqa: BLE001 - the caller falls back to a safe default
            return None
