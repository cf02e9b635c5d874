"""SES notifications (notificationType) and published events (eventType), normalized."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from pgcast.api import sns

BROADCAST_TAG = "pgcast_broadcast"  # EmailTags every SES send carries (worker/ses.py)
CONTACT_TAG = "pgcast_contact"
MESSAGE_TAG = "pgcast_message"  # a transactional message's id (callers' tags never start so)
MAX_ADDRESSES = 50  # SES sends to at most 50 recipients per message
MAX_DETAIL = 1000  # characters of a diagnostic kept


@dataclass(frozen=True)
class Event:
    """One SES event as pgcast_ses_event_v1 takes it."""

    event: str  # bounce | soft_bounce | complaint | delivery | the SES type, lowercased
    at: dt.datetime
    broadcast: uuid.UUID | None
    contact: int | None
    addresses: list[str]
    detail: str | None
    message_id: str | None = None  # SES's mail.messageId: an unknown row resolved gets it
    # Open and Click (docs/tracking.md): the request's User-Agent, the clicked URL, and when
    # the message was sent (an event seconds later is a machine's)
    user_agent: str | None = None
    link: str | None = None
    sent_at: dt.datetime | None = None
    # the transactional message the EmailTag pgcast_message names (worker/ses.py)
    message: uuid.UUID | None = None


def _when(raw: Any, fallback: dt.datetime) -> dt.datetime:
    if isinstance(raw, str):
        try:
            when = dt.datetime.fromisoformat(raw)
            if when.tzinfo is not None:
                return when
        except ValueError:
            pass
    return fallback


def _text(value: Any) -> str | None:
    """Printable text for the database (Postgres text holds no NUL), bounded."""
    return str(value).replace("\x00", "")[:MAX_DETAIL] if value else None


def _tag(tags: Any, name: str) -> str | None:
    values = tags.get(name) if isinstance(tags, dict) else None
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return None


def _tags(mail: dict[str, Any]) -> tuple[uuid.UUID | None, int | None]:
    """The broadcast and contact the EmailTags name, or (None, None) when either is bad."""
    raw_b, raw_c = _tag(mail.get("tags"), BROADCAST_TAG), _tag(mail.get("tags"), CONTACT_TAG)
    try:
        broadcast = uuid.UUID(raw_b) if raw_b else None
        contact = int(raw_c) if raw_c and raw_c.isdigit() and len(raw_c) <= 18 else None
    except ValueError:
        return None, None
    if broadcast is None or contact is None:
        return None, None
    return broadcast, contact


def _addresses(items: Any, key: str | None) -> list[str]:
    if not isinstance(items, list):
        return []
    out = [i.get(key) if key and isinstance(i, dict) else i for i in items[:MAX_ADDRESSES]]
    return [a for a in out if isinstance(a, str) and 0 < len(a) <= 320 and "\x00" not in a]


def parse(text: str, sns_time: dt.datetime) -> Event | None:
    """The event an SNS Message carries; None when it is not an SES event at all."""
    try:
        body = sns.loads(text)  # bounded depth: a deep nesting is not an SES event
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    event = _event(body, sns_time)
    mail = body.get("mail")
    raw = _tag(mail.get("tags"), MESSAGE_TAG) if isinstance(mail, dict) else None
    try:
        message = uuid.UUID(raw) if raw else None
    except ValueError:
        message = None
    if event is None or message is None:
        return event
    return dataclasses.replace(event, message=message)


def _event(body: dict[str, Any], sns_time: dt.datetime) -> Event | None:
    kind = body.get("eventType", body.get("notificationType"))
    mail = body.get("mail") if isinstance(body.get("mail"), dict) else {}
    if not isinstance(kind, str) or not isinstance(mail, dict):
        return None
    broadcast, contact = _tags(mail)
    fallback = _when(mail.get("timestamp"), sns_time)
    raw_id = mail.get("messageId")
    mid = _text(raw_id[:200]) if isinstance(raw_id, str) else None
    if kind == "Bounce" and isinstance(body.get("bounce"), dict):
        b = body["bounce"]
        recipients = b.get("bouncedRecipients")
        first = recipients[0] if isinstance(recipients, list) and recipients else {}
        diagnostic = first.get("diagnosticCode") if isinstance(first, dict) else None
        detail = " ".join(str(x) for x in (b.get("bounceType"), b.get("bounceSubType"),
                                           diagnostic) if x)
        hard = b.get("bounceType") == "Permanent"
        return Event("bounce" if hard else "soft_bounce", _when(b.get("timestamp"), fallback),
                     broadcast, contact, _addresses(recipients, "emailAddress"),
                     _text(detail), mid)
    if kind == "Complaint" and isinstance(body.get("complaint"), dict):
        c = body["complaint"]
        feedback = c.get("complaintFeedbackType")
        return Event("complaint", _when(c.get("timestamp"), fallback), broadcast, contact,
                     _addresses(c.get("complainedRecipients"), "emailAddress"),
                     _text(feedback), mid)
    if kind == "Delivery" and isinstance(body.get("delivery"), dict):
        d = body["delivery"]
        return Event("delivery", _when(d.get("timestamp"), fallback), broadcast, contact,
                     _addresses(d.get("recipients"), None), None, mid)
    if kind in ("Open", "Click") and isinstance(body.get(kind.lower()), dict):
        o = body[kind.lower()]
        agent, link = o.get("userAgent"), o.get("link")
        return Event(kind.lower(), _when(o.get("timestamp"), fallback), broadcast, contact, [],
                     None, mid, _text(agent) if isinstance(agent, str) else None,
                     link[:4096] if isinstance(link, str) and "\x00" not in link else None,
                     _when(mail.get("timestamp"), fallback))
    # Send, Reject, RenderingFailure: they resolve an unknown row; DeliveryDelay...: seen,
    # nothing to apply (Open and Click land in the tracking events, above)
    why: str | None = None
    for key in ("reject", "failure"):  # Reject's reason, RenderingFailure's errorMessage
        part = body.get(key)
        if isinstance(part, dict):
            why = why or _text(part.get("reason") or part.get("errorMessage"))
    # "Rendering Failure" (with a space, as SES spells it) is renderingfailure
    name = kind.lower().replace(" ", "").replace("\x00", "")[:40]
    return Event(name, fallback, broadcast, contact, [], why, mid)
