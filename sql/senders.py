"""Senders: the From addresses and domains an account may use, shared by the CLI and the API.

An account with no senders may use any From (as before 0015); with some, a broadcast's From
must be one of them (an address) or at one of them (a domain) to be sent, scheduled or
test-sent. Operators manage them (`pgcast senders`); there is no tenant route.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

from pgcast.mail import errors as mail_errors
from pgcast.mail import validate
from pgcast.sql import errors
from pgcast.sql.queries import QUERIES

SHOWN = 10  # senders named in a refusal


def normalize(raw: str) -> str:
    """An address or a domain, lower-cased, the domain in IDNA form; raises InvalidInput."""
    value = raw.strip()
    try:
        if "@" in value:
            return validate.address(value, "sender").lower()
        return validate.address(f"postmaster@{value}", "sender").partition("@")[2].lower()
    except mail_errors.InvalidValue as exc:
        raise errors.InvalidInput(f"{raw!r} is not an address or a domain: {exc.reason}"
                                  ) from None


def refusal(from_value: str, allowed: Sequence[str]) -> str | None:
    """Why an account whose senders are `allowed` may not send as from_value, else None."""
    if not allowed:
        return None
    try:
        address = validate.sender(from_value)[1].lower()
    except mail_errors.InvalidValue as exc:
        return str(exc)
    if address in allowed or address.partition("@")[2] in allowed:
        return None
    shown = ", ".join(allowed[:SHOWN]) + (", …" if len(allowed) > SHOWN else "")
    return (f"from: {address} is not a sender this account may use ({shown}); "
            "an operator allows more with `pgcast senders add`")


def refused_recipients(rows: Sequence[dict[str, Any]]) -> str | None:
    """The test-send refusal naming each address and why (the `refused` of
    pgcast_test_send_v2: field, address, reason), else None."""
    parts = []
    for field in ("to", "contact"):
        bad = [f"{r['address']} is {r['reason']}" for r in rows
               if r["reason"] and r.get("field", "to") == field]
        if bad:
            parts.append(f"{field}: " + "; ".join(bad))
    if not parts:
        return None
    return " ".join(parts) + " (a test send never mails or names such an address)"


def check(conn: psycopg.Connection[Any], account: str, broadcast_id: uuid.UUID,
          from_value: str | None = None) -> None:
    """Refuse (InvalidInput) a From the account may not use (the stored one, or `from_value`
    that an edit would store); an unknown broadcast passes."""
    row = conn.execute(QUERIES["broadcast_senders"],
                       {"account": account, "id": broadcast_id}).fetchone()
    if row is None:
        return
    reason = refusal(from_value or row["from_address"], list(row["senders"]))
    if reason:
        raise errors.InvalidInput(reason)
