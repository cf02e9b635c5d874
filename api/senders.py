"""The sender rule at the API's send, schedule and test send (sql.senders holds the rule)."""

from __future__ import annotations

import uuid

from starlette.requests import Request

from pgcast.api import context, db, errors
from pgcast.sql import senders


async def check(request: Request, account: str, broadcast_id: uuid.UUID,
                from_value: str | None = None) -> None:
    """422 when the account may not send as the broadcast's From (or as `from_value`, which
    an edit would store); an unknown id passes."""
    row = await db.one(context.pool(request), "broadcast_senders",
                       {"account": account, "id": broadcast_id})
    if row is None:
        return
    reason = senders.refusal(from_value or row["from_address"], list(row["senders"]))
    if reason:
        raise errors.InvalidBody(reason)
