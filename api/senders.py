"""The sender rule at the API's send, schedule and test send (sql.senders holds the rule)."""

from __future__ import annotations

import uuid

from starlette.requests import Request

from api import context, db, errors
from sql import senders


async def check(request: Request, account: str, broadcast_id: uuid.UUID) -> None:
    """422 when the account may not send as the broadcast's From; an unknown id passes."""
    row = await db.one(context.pool(request), "broadcast_senders",
                       {"account": account, "id": broadcast_id})
    if row is None:
        return
    reason = senders.refusal(row["from_address"], list(row["senders"]))
    if reason:
        raise errors.InvalidBody(reason)


async def check_recipients(request: Request, account: str, to: list[str]) -> None:
    """422 naming each test-send address that is unsubscribed, suppressed or erased."""
    rows = await db.all_rows(context.pool(request), "test_send_refusals",
                             {"account": account, "to": to})
    reason = senders.refused_recipients([dict(r) for r in rows])
    if reason:
        raise errors.InvalidBody(reason)
