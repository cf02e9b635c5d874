"""Per-recipient messages from a broadcast's content: the worker's door to mail.

Messages are rendered in the process's render pool (mail.renderpool), never on the event
loop, under the render budget; `render` (in this process) is for tests and benchmarks.
"""

from __future__ import annotations

import atexit
from typing import Any

from pgcast.mail import message, renderpool

Content = message.Content
Message = message.Message
Failure = renderpool.Failure
Pool = renderpool.RenderPool
Item = tuple[int, str, str | None, dict[str, Any] | None, list[str] | None, str | None]

_pool: renderpool.RenderPool | None = None


def pool() -> renderpool.RenderPool:
    """This process's render pool (PGCAST_RENDER_*), started on first use."""
    global _pool
    if _pool is None:
        _pool = renderpool.RenderPool()
        atexit.register(_pool.close)
    return _pool


def render(content: Content, contact_id: int, email_address: str, name: str | None,
           attributes: dict[str, Any] | None = None, tags: list[str] | None = None) -> Message:
    """The message for one recipient, in this process; raises mail.errors.RenderError."""
    return content.render(contact_id, email_address, name, attributes, tags)


async def render_many(content: Content, items: list[Item], stop_after: int = 0,
                      in_pool: renderpool.RenderPool | None = None) -> list[Message | Failure]:
    """Messages for many recipients, in the render pool (a Failure for each that cannot be
    built); after `stop_after` budget failures in a row the rest are not rendered."""
    return await (in_pool or pool()).run(content.account, "messages",
                                         renderpool.spec(content), items, stop_after)


async def render_one(content: Content, item: Item) -> Message:
    """One message, in the render pool; raises mail.errors.RenderError (RenderBudget)."""
    result: Message = await renderpool.one(pool(), content.account, "messages",
                                           renderpool.spec(content), item)
    return result
