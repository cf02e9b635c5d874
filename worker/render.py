"""Per-recipient messages from a broadcast's content."""

from __future__ import annotations

import email.utils
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Content:
    """What every message of one broadcast shares."""

    broadcast_id: str
    account: str
    subject: str
    from_address: str
    text: str | None
    html: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Content:
        """From a broadcast_content row."""
        return cls(str(row["id"]), row["account"], row["subject"], row["from_address"],
                   row["text_body"], row["html_body"])


@dataclass(frozen=True)
class Message:
    """One rendered email for one recipient."""

    contact_id: int
    to: str
    from_address: str
    subject: str
    text: str | None
    html: str | None
    headers: dict[str, str] = field(default_factory=dict)


def render(content: Content, contact_id: int, email_address: str, name: str | None) -> Message:
    """The message for one recipient (the place merge tags will plug in)."""
    to = email.utils.formataddr((name, email_address)) if name else email_address
    headers = {"X-Pgcast-Broadcast": content.broadcast_id}
    return Message(contact_id, to, content.from_address, content.subject, content.text,
                   content.html, headers)
