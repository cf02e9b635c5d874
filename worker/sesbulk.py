"""SendBulkEmail's request and answers, for worker.ses (issue 32): what fits an entry, the
request of one chunk, each entry's result as what the engine must do."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from pgcast.mail import message as mail_message
from pgcast.worker import errors, render

MOST = 50  # entries per call: SES's own limit
BULK_HEADERS = 15  # ReplacementHeaders per entry (and Template.Headers): SES's limit
HEADER_VALUE = re.compile(r"[\x20-\x7e]{1,995}")  # a bulk header value: printable ASCII
TEMPLATE = "{{"  # SES's template syntax: a rendered part holding it goes by SendEmail
# a BulkEmailEntryResult's Status, by what the engine must do, with the SendEmail error code
# of the same refusal (last_error reads the same whichever call carried the message)
BULK_RECIPIENT = {"MESSAGE_REJECTED": "MessageRejected",
                  "INVALID_PARAMETER": "InvalidParameterValue"}
BULK_THROTTLED = {"ACCOUNT_THROTTLED": "TooManyRequestsException"}
BULK_ACCOUNT = {  # -> (pause reason, code): ACCOUNT_LEVEL's reasons
    "ACCOUNT_SUSPENDED": ("account_suspended", "AccountSuspendedException"),
    "ACCOUNT_SENDING_PAUSED": ("sending_paused", "SendingPausedException"),
    "ACCOUNT_DAILY_QUOTA_EXCEEDED": ("daily_quota", "LimitExceededException"),
    "MAIL_FROM_DOMAIN_NOT_VERIFIED": ("mail_from_not_verified",
                                      "MailFromDomainNotVerifiedException"),
    "CONFIGURATION_SET_NOT_FOUND": ("configuration_set", "ConfigurationSetDoesNotExist"),
    "CONFIGURATION_SET_SENDING_PAUSED": ("configuration_set",
                                         "ConfigurationSetSendingPausedException"),
    "INVALID_SENDING_POOL_NAME": ("configuration_set", "InvalidSendingPoolName"),
}


def fits(message: render.Message) -> bool:
    """A message SendBulkEmail can carry as today's SendEmail does: no `{{` in a rendered part
    or header (SES's template syntax: we cannot prove SES leaves it alone), headers SES
    takes in a bulk entry (at most BULK_HEADERS, printable ASCII values of 1-995
    characters), a broadcast's message (a transactional one goes by itself)."""
    if "X-Pgcast-Message" in message.headers or len(message.headers) > BULK_HEADERS:
        return False
    if any(TEMPLATE in part for part in (message.subject, message.text, message.html)
           if part is not None):
        return False
    return all(HEADER_VALUE.fullmatch(v) and TEMPLATE not in v
               for v in message.headers.values())


def shape(message: render.Message) -> tuple[str, bool, bool]:
    """What every entry of one SendBulkEmail call shares: the sender and which parts exist."""
    return (message.from_address, message.text is not None, message.html is not None)


def request(messages: Sequence[render.Message], tags: Sequence[list[dict[str, str]]],
            configuration_set: str | None) -> dict[str, Any]:
    """One SendBulkEmail request for messages of one shape, with each message's EmailTags
    (`tags`, what SendEmail would send: ses.email_tags): inline template
    content whose parts are each entry's own rendered ones (ReplacementTemplateData), what
    every entry has alike sent once (Template.Headers, DefaultEmailTags), per entry only what
    differs (ReplacementHeaders: List-Unsubscribe; ReplacementTags: pgcast_contact)."""
    first = messages[0]
    content: dict[str, str] = {"Subject": "{{subject}}"}
    if first.text is not None:
        content["Text"] = "{{text}}"
    if first.html is not None:
        content["Html"] = "{{html}}"
    shared = {k: v for k, v in first.headers.items()
              if all(m.headers.get(k) == v for m in messages[1:])}
    shared_tags = [t for t in tags[0] if all(t in other for other in tags[1:])]
    entries = []
    for m, own_tags in zip(messages, tags, strict=True):
        data = {"subject": mail_message.ses_subject(m.subject)}  # what SendEmail's Subject has
        if m.text is not None:
            data["text"] = m.text
        if m.html is not None:
            data["html"] = m.html
        entry: dict[str, Any] = {
            "Destination": {"ToAddresses": [mail_message.unfolded(m.to)]},
            "ReplacementEmailContent": {"ReplacementTemplate": {
                "ReplacementTemplateData": json.dumps(data)}},
        }
        headers = [{"Name": k, "Value": v} for k, v in m.headers.items() if k not in shared]
        if headers:
            entry["ReplacementHeaders"] = headers
        own = [t for t in own_tags if t not in shared_tags]
        if own:
            entry["ReplacementTags"] = own
        entries.append(entry)
    template: dict[str, Any] = {"TemplateContent": content, "TemplateData": "{}"}
    if shared:
        template["Headers"] = [{"Name": k, "Value": v} for k, v in shared.items()]
    request: dict[str, Any] = {
        "FromEmailAddress": mail_message.unfolded(first.from_address),
        "DefaultContent": {"Template": template},
        "BulkEmailEntries": entries,
    }
    if shared_tags:
        request["DefaultEmailTags"] = shared_tags
    if configuration_set:
        request["ConfigurationSetName"] = configuration_set
    return request


def outcome(result: Any) -> str | errors.ProviderError:
    """One BulkEmailEntryResult: the message id (SUCCESS) or what the engine must do."""
    if not isinstance(result, dict):
        return errors.OutcomeUnknown(f"SendBulkEmail answered {result!r} for an entry")
    status = str(result.get("Status", ""))
    text = str(result.get("Error") or "") or status
    if status == "SUCCESS":
        message_id = result.get("MessageId")
        if not message_id:  # SES took it and we cannot tell which message it is
            return errors.OutcomeUnknown("no answer from SES: SUCCESS with no MessageId")
        return str(message_id)
    if status in BULK_RECIPIENT:
        return errors.RecipientRejected(f"{BULK_RECIPIENT[status]}: {text}")
    if status in BULK_THROTTLED:
        return errors.Throttled(f"{BULK_THROTTLED[status]}: {text}")
    if status in BULK_ACCOUNT:
        why, code = BULK_ACCOUNT[status]
        return errors.AccountBlocked(why, f"{code}: {text}")
    # TRANSIENT_FAILURE, FAILED, TEMPLATE_NOT_FOUND (inline content has no template) and
    # anything new: SES answered that it did not send it; retried a bounded number of times
    return errors.Transient(f"{status or 'no status'}: {text} (SendBulkEmail)")
