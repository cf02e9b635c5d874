"""Per-recipient messages from a broadcast's content: the worker's door to mail.message."""

from __future__ import annotations

from typing import Any

from mail import message

Content = message.Content
Message = message.Message


def render(content: Content, contact_id: int, email_address: str, name: str | None,
           attributes: dict[str, Any] | None = None, tags: list[str] | None = None) -> Message:
    """The message for one recipient; raises mail.errors.RenderError when it cannot be built."""
    return content.render(contact_id, email_address, name, attributes, tags)
