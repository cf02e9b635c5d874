"""A preview: what one contact would receive, as JSON-ready values."""

from __future__ import annotations

from typing import Any

from mail import message

# when the account has no contact yet
SAMPLE: dict[str, Any] = {"id": 0, "email": "sample@example.com", "name": "Sample Contact",
                          "tags": [], "attributes": {}}


def of(content: message.Content, contact: dict[str, Any] | None) -> dict[str, Any]:
    """Subject, text, html and headers for one contact row (or the sample); RenderError."""
    who = contact or SAMPLE
    msg = content.render(int(who["id"]), str(who["email"]), who.get("name"),
                         who.get("attributes"), who.get("tags"))
    headers = {"From": message.unfolded(msg.from_address), "To": message.unfolded(msg.to),
               "Subject": message.unfolded(message.subject_header(msg.subject)),
               **msg.headers}
    return {"contact": who["email"], "sample": contact is None, "subject": msg.subject,
            "text": msg.text, "html": msg.html, "headers": headers}
