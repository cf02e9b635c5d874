"""A preview: what one contact would receive, as JSON-ready values."""

from __future__ import annotations

from typing import Any

from pgcast.mail import errors, message

# when the account has no contact yet
SAMPLE: dict[str, Any] = {"id": 0, "email": "sample@example.com", "name": "Sample Contact",
                          "tags": [], "attributes": {}}


def of(content: message.Content, contact: dict[str, Any] | None) -> dict[str, Any]:
    """Subject, text, html and headers for one contact row (or the sample); RenderError."""
    who = contact or SAMPLE
    msg = content.render(int(who["id"]), str(who["email"]), who.get("name"),
                         who.get("attributes"), who.get("tags"), deliver_to=who.get("deliver_to"),
                         token=who.get("token"))
    headers = {"From": message.unfolded(msg.from_address), "To": message.unfolded(msg.to),
               "Subject": message.unfolded(message.subject_header(msg.subject)),
               **msg.headers}
    return {"contact": who["email"], "sample": contact is None, "subject": msg.subject,
            "text": msg.text, "html": msg.html, "headers": headers}


def trial(subject: str, from_address: str, text: str | None, html: str | None, *,
          timeout_ms: int | None = None) -> None:
    """Render a broadcast's templates for the sample contact under the render budget;
    raises TemplateInvalid naming the budget it went over (or the render error)."""
    content = message.Content("00000000-0000-0000-0000-000000000000", "trial", subject,
                              from_address, text, html, inert=True, timeout_ms=timeout_ms)
    if content.problem:  # the From or a template cannot be compiled: the checks say why
        return
    try:
        of(content, None)
    except errors.RenderBudget as exc:
        raise errors.TemplateInvalid("template", None, f"a trial render for a sample contact "
                                                       f"went over its budget: {exc}") from None
    except errors.RenderError:
        return  # a fault of this sample's data (missing attribute, ...), not of the budget
