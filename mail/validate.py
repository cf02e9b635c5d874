"""Checks at the edge: what a name, subject, address, From or tag may hold.

User data is data: nothing stored may become header syntax. Names, subjects and addresses
refuse the characters that end or fold a header line (CR, LF, NUL, NEL, VT, FF, the Unicode
line and paragraph separators) and every other control character; lengths are checked
before any parser sees the value, so an 8 MB address costs one comparison.
"""

from __future__ import annotations

import email.errors
import email.headerregistry
import email.policy
import json
import math
import unicodedata
from typing import Any

import email_validator

from pgcast.mail import errors

MAX_ACCOUNT_LENGTH = 200  # characters: the one limit (JWT claim, CLI, a CHECK in SQL)
MAX_ADDRESS_LENGTH = 254  # characters: RFC 5321's path limit less the brackets
MAX_NAME_LENGTH = 500  # characters
MAX_SUBJECT_LENGTH = 998  # characters: RFC 5322's line limit
MAX_FROM_LENGTH = 600  # characters: a display name and an address
MAX_TAG_LENGTH = 100  # characters
MAX_TAGS = 100  # tags per contact
MAX_ATTRIBUTES = 50  # keys per contact
MAX_ATTRIBUTE_KEY = 64  # characters
MAX_ATTRIBUTE_VALUE = 1000  # characters of one string value
MAX_ATTRIBUTES_BYTES = 8192  # bytes of one contact's attributes as JSON

# Characters that end, fold or hide a header line, named in the message a user sees.
_LINE_BREAKS = {"\r": "CR", "\n": "LF", "\x00": "NUL", "\x85": "NEL (U+0085)",
                "\u2028": "U+2028", "\u2029": "U+2029", "\v": "VT", "\f": "FF"}


def control_character(value: str) -> str | None:
    """The name of the first control character in value (TAB allowed), else None."""
    for ch in value:
        if ch in _LINE_BREAKS:
            return _LINE_BREAKS[ch]
        if ch != "\t" and unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return f"U+{ord(ch):04X}"
    return None


def _no_controls(field: str, value: str) -> None:
    found = control_character(value)
    if found:
        raise errors.InvalidValue(field, f"must not contain a control character ({found})")


def text_line(field: str, value: Any, max_length: int, *, required: bool = True) -> str:
    """A one-line text value (a name, a subject), stripped; raises InvalidValue."""
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise errors.InvalidValue(field, "must be a string")
    if len(value) > max_length:
        raise errors.InvalidValue(field, f"must be at most {max_length} characters")
    _no_controls(field, value)
    clean: str = value.strip()
    if required and not clean:
        raise errors.InvalidValue(field, "must not be empty")
    return clean


def account(value: Any, field: str = "account") -> str:
    """An account (tenant) name, kept as given: 1-200 characters, no control character."""
    if not isinstance(value, str) or not value:
        raise errors.InvalidValue(field, "must be a non-empty string")
    if len(value) > MAX_ACCOUNT_LENGTH:
        raise errors.InvalidValue(field, f"must be at most {MAX_ACCOUNT_LENGTH} characters")
    try:  # a lone surrogate cannot be encoded; Postgres text cannot hold NUL
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidValue(field, "must be valid Unicode") from None
    _no_controls(field, value)
    return value


def name(value: Any, field: str = "name") -> str:
    """A contact's display name ('' when absent)."""
    return text_line(field, value, MAX_NAME_LENGTH, required=False)


def subject(value: Any, field: str = "subject") -> str:
    """A broadcast's subject line."""
    return text_line(field, value, MAX_SUBJECT_LENGTH)


def address(value: Any, field: str = "email") -> str:
    """A recipient address, normalized: the domain in its IDNA (punycode) form.

    A non-ASCII local part (`üser@example.com`) is refused: it needs SMTPUTF8, which SES
    does not offer, so such a message could never be sent.
    """
    if not isinstance(value, str):
        raise errors.InvalidValue(field, "must be a string")
    if len(value) > MAX_ADDRESS_LENGTH + 2:  # before any parser: bounded work
        raise errors.InvalidValue(field, f"must be at most {MAX_ADDRESS_LENGTH} characters")
    _no_controls(field, value)
    raw = value.strip()
    local = raw.rpartition("@")[0]
    if not local.isascii():
        raise errors.InvalidValue(
            field, "the part before @ must be ASCII (SES cannot send to an internationalised "
                   "mailbox name)")
    try:
        info = email_validator.validate_email(raw, check_deliverability=False,
                                              allow_smtputf8=False)
    except email_validator.EmailNotValidError as exc:
        raise errors.InvalidValue(field, str(exc)) from None
    ascii_form = info.ascii_email
    if ascii_form is None or len(ascii_form) > MAX_ADDRESS_LENGTH:
        raise errors.InvalidValue(field, f"must be at most {MAX_ADDRESS_LENGTH} characters")
    return str(ascii_form)


def sender(value: Any, field: str = "from") -> tuple[str, str]:
    """A From value, `addr` or `Name <addr>`: (display name, normalized address).

    Exactly one address, parsed the way a mail reader parses it; anything a reader would
    read differently from what was given (a second address, an unquoted @ in the display
    name, a group) is refused with the reason, never rewritten.
    """
    if not isinstance(value, str):
        raise errors.InvalidValue(field, "must be a string")
    if len(value) > MAX_FROM_LENGTH:
        raise errors.InvalidValue(field, f"must be at most {MAX_FROM_LENGTH} characters")
    _no_controls(field, value)
    raw = value.strip()
    if not raw:
        raise errors.InvalidValue(field, "must not be empty")
    header = email.policy.default.header_factory("From", raw)
    defects = list(getattr(header, "defects", []))
    addresses: list[email.headerregistry.Address] = list(getattr(header, "addresses", []))
    groups: list[email.headerregistry.Group] = list(getattr(header, "groups", []))
    if len(addresses) != 1 or any(g.display_name for g in groups):
        raise errors.InvalidValue(field, "must be exactly one address, as `Name <a@example.com>`")
    if defects:
        raise errors.InvalidValue(
            field, "is not a valid address line (quote a display name that contains "
                   "@, comma or angle brackets: \"Acme, Inc.\" <a@example.com>)")
    parsed = addresses[0]
    if not parsed.addr_spec or "@" not in parsed.addr_spec:
        raise errors.InvalidValue(field, "has no address")
    if parsed.display_name and "@" in parsed.display_name and '"' not in raw:
        raise errors.InvalidValue(
            field, "a display name with @ must be quoted: \"Name\" <a@example.com>")
    normalized = address(parsed.addr_spec, field)
    display = parsed.display_name or ""
    _no_controls(field, display)
    return display, normalized


def tags(value: Any, field: str = "tags") -> list[str]:
    """At most MAX_TAGS non-empty tags of at most MAX_TAG_LENGTH characters, deduplicated."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise errors.InvalidValue(field, "must be a list of strings")
    if len(value) > MAX_TAGS:  # before looking at any of them: bounded work
        raise errors.InvalidValue(field, f"at most {MAX_TAGS} tags per contact")
    out: list[str] = []
    seen: set[str] = set()
    for item in value:
        tag = text_line(field, item, MAX_TAG_LENGTH)
        if tag not in seen:
            seen.add(tag)
            out.append(tag)
    return out


def attributes(value: Any, field: str = "attributes") -> dict[str, str | int | float | bool]:
    """A contact's custom attributes: a flat JSON object of strings, numbers and booleans."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.InvalidValue(field, "must be an object")
    if len(value) > MAX_ATTRIBUTES:
        raise errors.InvalidValue(field, f"at most {MAX_ATTRIBUTES} attributes per contact")
    out: dict[str, str | int | float | bool] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key.strip():
            raise errors.InvalidValue(field, "attribute names must be non-empty strings")
        if len(key) > MAX_ATTRIBUTE_KEY:
            raise errors.InvalidValue(field, f"attribute names are at most "
                                             f"{MAX_ATTRIBUTE_KEY} characters")
        _no_controls(f"{field}.{key}", key)
        if isinstance(item, str):
            if len(item) > MAX_ATTRIBUTE_VALUE:
                raise errors.InvalidValue(f"{field}.{key}",
                                          f"at most {MAX_ATTRIBUTE_VALUE} characters")
            if "\x00" in item:
                raise errors.InvalidValue(f"{field}.{key}", "must not contain NUL")
        elif isinstance(item, float) and not math.isfinite(item):
            raise errors.InvalidValue(f"{field}.{key}", "must be a finite number")
        elif not isinstance(item, bool | int | float):
            raise errors.InvalidValue(f"{field}.{key}",
                                      "must be a string, a number or a boolean")
        out[key.strip()] = item
    if len(json.dumps(out, ensure_ascii=False).encode()) > MAX_ATTRIBUTES_BYTES:
        raise errors.InvalidValue(field, f"at most {MAX_ATTRIBUTES_BYTES} bytes as JSON")
    return out
