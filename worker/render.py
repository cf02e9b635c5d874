"""Per-recipient messages from a broadcast's content: the worker's door to mail.

Messages are rendered in the process's render pool (mail.renderpool), never on the event
loop, under the render budget; `render` (in this process) is for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import atexit
from collections.abc import Sequence
from typing import Any

from pgcast.mail import message, renderpool, renderproc

Content = message.Content
Message = message.Message
Skeleton = message.Skeleton
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


async def skeleton(content: Content,
                   in_pool: renderpool.RenderPool | None = None) -> Skeleton | None:
    """The content's skeleton (message.Content.fill makes each recipient's message from it in
    this process), rendered once in the render pool under the render budget; None when the
    content cannot be made that way (its templates do more than print their links, or the
    render failed: each message is then rendered in the pool); raises RuntimeError when the
    pool did not render it (a render process that cannot start: worth asking again)."""
    if content.links_printed() is None:
        return None
    made = (await (in_pool or pool()).run(content.account, "skeleton", renderpool.spec(content),
                                          [content.stand_in()]))[0]
    if isinstance(made, Failure) and made.skipped:  # not rendered (no process): ask again
        raise RuntimeError(made.reason)
    if isinstance(made, Skeleton) and content.usable(made):
        return made
    return None


FILL_CHUNK = 100  # messages filled between two turns of the event loop


async def fill_many(content: Content, made: Skeleton,
                    items: Sequence[tuple[Any, ...]]) -> list[Message | Failure]:
    """Messages for many recipients (contact id, address, name, ...) from a usable skeleton,
    in this process (no template runs: message.Filler); a Failure for each that cannot be
    built, with the reason the render pool would give. The event loop gets a turn every
    FILL_CHUNK messages."""
    out: list[Message | Failure] = []
    fill = content.filler(made).fill
    failure = renderproc.failure
    for start in range(0, len(items), FILL_CHUNK):
        if start:
            await asyncio.sleep(0)
        chunk = items[start:start + FILL_CHUNK]
        try:
            made_now: list[Message | Exception] = fill(chunk)
        except Exception:  # noqa: BLE001 - not the group's fault: each recipient on its own
            made_now = [_one(content, made, item) for item in chunk]
        out.extend([m if isinstance(m, Message) else failure(m) for m in made_now])
    return out


def _one(content: Content, made: Skeleton, item: tuple[Any, ...]) -> Message | Exception:
    """One recipient's message, or what its fill raised."""
    try:
        return content.fill(made, item[0], item[1], item[2])
    except Exception as exc:  # noqa: BLE001 - every fault is this recipient's, as in the pool
        return exc
