"""`pgcast` with main's plain renderer (before mail/): the drain's baseline, in the same run.

main's worker/render.render at commit eb44a82, verbatim but for its name: the same text for
everyone, a formataddr To, one header. The null provider receives its Message.
"""

from __future__ import annotations

import email.utils
import sys
from typing import Any

from pgcast.bin import cli
from pgcast.mail import message
from pgcast.worker import render


def plain_render(content: message.Content, contact_id: int, email_address: str,
                 name: str | None, attributes: dict[str, Any] | None = None) -> message.Message:
    """main's render(): no template, no unsubscribe link."""
    to = email.utils.formataddr((name, email_address)) if name else email_address
    headers = {"X-Pgcast-Broadcast": content.broadcast_id}
    return message.Message(contact_id, to, content.from_source, content.subject_source,
                           content.text_source, content.html_source, headers)


if __name__ == "__main__":
    render.render = plain_render
    sys.exit(cli.main())
