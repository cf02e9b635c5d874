"""Transactional messages: the checks of what a caller may set, and the email one row makes.

User data is data (as in mail.message): addresses go through addr_spec and mailbox, the
subject through one_line, and a caller's extra headers only from a short allow-list, their
values on one line. The API checks a request with these; the worker builds the email.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from pgcast.mail import errors, message, sandbox, template, validate

CATEGORIES = ("transactional", "marketing", "confirmation")
# headers a caller may add: threading and references; any other X- header except ours and SES's
ALLOWED_HEADERS = ("In-Reply-To", "References", "X-Entity-Ref-ID")
_X_HEADER = re.compile(r"X-[A-Za-z0-9-]{1,60}")
_RESERVED = ("x-pgcast-", "x-ses-", "x-amz-")
MAX_HEADERS = 20
MAX_HEADER_VALUE = 998  # characters: one RFC 5322 line
_TAG = re.compile(r"[A-Za-z0-9_-]{1,256}")  # SES EmailTags: names and values
MAX_TAGS = 10  # SES allows 50 a message; two are ours
HEADER = "X-Pgcast-Message"  # names the message in the outbox and in SES's EmailTags


def headers(raw: Any) -> dict[str, str]:
    """A caller's extra headers, checked; raises mail.errors.InvalidValue."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise errors.InvalidValue("headers", "must be an object of header names to values")
    if len(raw) > MAX_HEADERS:
        raise errors.InvalidValue("headers", f"at most {MAX_HEADERS} headers")
    out: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(value, str):
            raise errors.InvalidValue("headers", f"{name}: the value must be a string")
        allowed = next((h for h in ALLOWED_HEADERS if h.lower() == str(name).lower()), None)
        if allowed is None and not (_X_HEADER.fullmatch(str(name))
                                    and not str(name).lower().startswith(_RESERVED)):
            raise errors.InvalidValue("headers", f"{name!r} may not be set (allowed: "
                                      f"{', '.join(ALLOWED_HEADERS)}, or X-... other than "
                                      "X-Pgcast-, X-SES- and X-Amz-)")
        text = message.one_line(value)
        if len(text) > MAX_HEADER_VALUE:
            raise errors.InvalidValue("headers", f"{name}: at most {MAX_HEADER_VALUE} characters")
        out[allowed or str(name)] = text
    return out


def tags(raw: Any) -> dict[str, str]:
    """SES EmailTags (name -> value, letters, digits, _ and -), checked; raises InvalidValue."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise errors.InvalidValue("tags", "must be an object of tag names to values")
    if len(raw) > MAX_TAGS:
        raise errors.InvalidValue("tags", f"at most {MAX_TAGS} tags")
    for name, value in raw.items():
        if not isinstance(value, str) or not _TAG.fullmatch(str(name)) \
                or not _TAG.fullmatch(value) or str(name).lower().startswith("pgcast"):
            raise errors.InvalidValue("tags", f"{name!r}: names and values are 1-256 letters, "
                                      "digits, _ or -, and names do not start with pgcast")
    return {str(k): v for k, v in raw.items()}


def category(raw: Any) -> str:
    """transactional (the default), marketing or confirmation; raises InvalidValue."""
    if raw is None:
        return "transactional"
    if raw not in CATEGORIES:
        raise errors.InvalidValue("category", f"must be one of {', '.join(CATEGORIES)}")
    return str(raw)


def compose(row: dict[str, Any], number: int,
            unsubscribe_url: str | None = None) -> message.Message:
    """The email of one handed-off message row; `number` stands for its contact id (the
    provider's file name and tags use the message id in X-Pgcast-Message). A `marketing`
    message carries one-click unsubscribe (RFC 8058) to `unsubscribe_url`, which it must
    have; the other categories never do. Raises mail.errors.RenderError or InvalidValue when
    it cannot be built."""
    display, spec = _sender(row["from_address"])
    to = message.addr_spec(row["to_address"])
    extra = dict(row.get("headers") or {})
    if row.get("reply_to"):
        reply_name, reply_spec = _sender(row["reply_to"])
        extra["Reply-To"] = message.mailbox(reply_name, reply_spec, "Reply-To")
    if row.get("category") == "marketing":
        if not unsubscribe_url:
            raise errors.InvalidValue("category", "a marketing message needs its unsubscribe "
                                      "link")
        extra["List-Unsubscribe"] = f"<{unsubscribe_url}>"
        extra["List-Unsubscribe-Post"] = message.LIST_UNSUBSCRIBE_POST
    extra[HEADER] = str(row["id"])
    return message.Message(number, to, message.mailbox(display, spec, "From"),
                           message.one_line(row["subject"]), row.get("text_body"),
                           row.get("html_body"), extra, to,
                           tags=dict(row.get("tags") or {}))


@functools.lru_cache(maxsize=1024)
def _sender(value: str) -> tuple[str, str]:
    """validate.sender, kept per value: a worker sends many messages from few senders (a form's
    confirmations all have its From), and parsing and validating one was a tenth of its CPU
    per message. A refused value raises each time (exceptions are not cached)."""
    return validate.sender(value)


def render_template(subject: str, text: str | None, html: str | None, data: dict[str, Any],
                    timeout_ms: int | None = None) -> tuple[str, str | None, str | None]:
    """A message's template (subject, text, html) rendered with `{{ data.x }}`, under one
    render budget; raises mail.errors.RenderError (RenderBudget)."""
    budget = template.timeout_ms() if timeout_ms is None else timeout_ms
    with sandbox.charged(budget):
        context = {"data": data}
        out_subject = message.one_line(template.compile_part("subject", subject)(context))
        out_text = template.compile_part("text", text)(context) if text is not None else None
        out_html = template.compile_part("html", html)(context) if html is not None else None
    return out_subject, out_text, out_html
