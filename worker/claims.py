"""Claiming: which rows of a broadcast a loop takes next, and how many."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgcast.worker import pg

PAST_END = 2**63 - 1  # a claim cursor past every contact_id: no fresh row left to look for
CLAIM_SECONDS = 1.0  # seconds of this process's sending that its claims hold at once


@dataclass
class Active:
    """One broadcast a process works on, and where its fresh rows are."""

    epoch: int
    rate_limit: float | None
    empty: bool = False  # its last claim came back empty: skip it until the next look
    # Fresh rows (never claimed) are claimed in contact_id order after `cursor`, the highest
    # fresh contact_id this process took. No fresh row is below `floor`: the lowest fresh row
    # when this process last looked behind its cursor (PAST_END: none is left).
    cursor: int = 0
    floor: int = 0
    looking: bool = False  # one of this process's loops is reading the floor right now
    # monotonic: after an unexpected error, leave it alone till then (-inf: never held back;
    # monotonic() counts from boot, so 0.0 is not "long ago" on a machine booted just now)
    not_before: float = -math.inf
    errors: int = 0  # unexpected errors in a row
    ramp: int = 0  # with nothing to size claims by: the next claim's size (0: not started)
    share: float = 1.0  # its nominal fair share of the global rate (a fraction of 1)
    claimed: float = 0.0  # rows this process claimed of it over its weight (stride pass)


def claim_size(rows_per_second: float, loops: int, lease: float, batch_size: int) -> int:
    """Rows one claim takes: the loops' claims together hold about CLAIM_SECONDS (at most a
    third of a lease) of what the process can send, so that several processes share even a
    small broadcast; between 1 and batch_size."""
    horizon = min(CLAIM_SECONDS, lease / 3)
    want = rows_per_second * horizon / max(1, loops)
    if not math.isfinite(want):
        return batch_size
    return max(1, min(batch_size, math.ceil(want)))


def ramped(entry: Active, size: int, loops: int, batch_size: int) -> int:
    """With nothing to size claims by (no rate limit, a provider that answers at once), a
    process's claims of a broadcast start at a batch over its loops and double per claim up
    to `size`: a second process that wakes a moment after the first still finds work in a
    small broadcast, and a big one soon gets whole batches (one statement per batch)."""
    if entry.ramp == 0:
        entry.ramp = max(1, math.ceil(batch_size / max(1, loops)))
    take = min(size, entry.ramp)
    entry.ramp = min(batch_size, entry.ramp * 2)
    return take


class Claims:
    """Claims rows of one broadcast for one loop: requeued first, then fresh after a cursor."""

    def __init__(self, db: pg.Db, worker: str, lease: float,
                 halted: Callable[[uuid.UUID, int], bool]) -> None:
        self.db = db
        self.worker = worker
        self.lease = lease
        self.halted = halted

    async def claim(self, bid: uuid.UUID, entry: Active, token: uuid.UUID, limit: int,
                    query: str = "claim", contact: bool = True) -> pg.Rows:
        """A batch (`claim`, or `claim_handoff`): every row has contact_id, attempts, epoch
        and last_fresh (the cursor's next value); `claim_handoff`'s rows have the contact's
        attributes and tags only with `contact`."""
        params: dict[str, Any] = {"id": bid, "limit": limit, "token": token,
                                  "worker": self.worker, "lease": self.lease,
                                  "after": entry.cursor, "contact": contact}
        rows = await self.db.table(query, params)
        if rows and rows.first("last_fresh") is not None:
            entry.cursor = rows.first("last_fresh")
            return rows
        if not rows and self.halted(bid, entry.epoch):
            return rows  # paused or cancelled: nothing to look for
        try:
            moved = await self._look_behind(bid, entry)
        except pg.UNREACHABLE:
            if rows:
                return rows  # claimed: work them; the floor can wait for the next claim
            raise
        if moved and not rows:
            rows = await self.db.table(query, {**params, "after": entry.cursor})
            if rows and rows.first("last_fresh") is not None:
                entry.cursor = rows.first("last_fresh")
        return rows

    async def _look_behind(self, bid: uuid.UUID, entry: Active) -> bool:
        """No fresh row was free after the cursor: the others took them, hold them right now,
        or (rarely) one was locked when this process walked past it by a transaction that
        then rolled back. Where do fresh rows begin? A plain read from the last floor, so the
        walk over rows claimed earlier happens once per broadcast, not per claim. Moves the
        cursor to just below the floor (past the end when none is left); True when it moved
        to a row worth claiming from.

        One loop at a time: the loops of a process reach the end of the fresh rows together,
        and each read walks every row claimed before it (measured: the reads were 2.9-8.1% of
        a 200k drain's samples when every loop made its own, 1.6% with one at a time)."""
        if entry.floor >= PAST_END or entry.looking:
            return False
        entry.looking = True
        try:
            found = await self.db.q("fresh_floor", {"id": bid, "from": entry.floor})
        finally:
            entry.looking = False
        floor = found[0][0] if found else None
        entry.floor = PAST_END if floor is None else floor
        moved = PAST_END if floor is None else floor - 1
        if moved == entry.cursor:
            return False
        entry.cursor = moved
        return floor is not None
