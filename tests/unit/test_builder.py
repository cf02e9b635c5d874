"""worker.dispatch.Builder: budget failures in a row counted per broadcast, in real processes."""

from __future__ import annotations

import asyncio
import uuid

from pgcast.mail import message, renderpool
from pgcast.worker import dispatch
from tests.unit.test_render_budget import MACRO


def test_groups_side_by_side_add_their_failures_and_a_gone_broadcast_is_forgotten() -> None:
    pool = renderpool.RenderPool(processes=2, share=2, timeout_ms=50)
    bid = uuid.uuid4()
    bomb = message.Content(str(bid), "a", "S", "f@example.com", MACRO, None)
    builder = dispatch.Builder(pool)

    async def two_groups() -> None:
        await pool.start()
        await asyncio.gather(*(builder.build(bomb, [dispatch.Recipient(i, f"{i}@x.org", None)])
                               for i in (1, 2)))

    try:
        asyncio.run(two_groups())
    finally:
        pool.close()
    # both groups read the streak before their render; each failure counts
    assert builder.streaks == {(str(bid), bomb.key): 2}
    builder.forget(uuid.uuid4())
    assert builder.streaks
    builder.forget(bid)  # the picker's broadcast is no longer active
    assert builder.streaks == {}
