"""Which broadcast a dispatch loop works on next, and what it says.

The sending broadcasts come from the database at most once a poll interval (or at once when
LISTEN says something changed), furthest below their fair share of the global rate first
(query `active_broadcasts`), at most --max-broadcasts of them; loops take them round robin.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from worker import claims, dispatch, pg, render

log = logging.getLogger("pgcast.worker")


class Picker:
    """The broadcasts one process works on, taken round robin by its loops."""

    def __init__(self, db: pg.Db, rates: dict[str, float], bursts: dict[str, float],
                 max_broadcasts: int, poll: float,
                 forget: Callable[[uuid.UUID], None]) -> None:
        self.db = db
        self.rates = rates
        self.bursts = bursts
        self.max_broadcasts = max_broadcasts
        self.poll = poll
        self.forget = forget  # a broadcast no longer worked on (its takers' state goes)
        self.active: dict[uuid.UUID, claims.Active] = {}
        self._order: list[uuid.UUID] = []
        self._next = 0
        self._refreshed = 0.0
        self._content: dict[uuid.UUID, render.Content | str] = {}

    async def refresh(self) -> None:
        """Read the sending broadcasts and the global bucket again."""
        rows = await self.db.q("active_broadcasts")
        bucket = await self.db.q("rate_get", {"name": "global"})
        if bucket:
            self.rates["global"] = float(bucket[0][1])
            self.bursts["global"] = float(bucket[0][2])
        limit = self.max_broadcasts or len(rows)
        fresh: dict[uuid.UUID, claims.Active] = {}
        for bid, epoch, rate_limit in rows[:limit]:
            if bid not in self.active:
                log.info("working on broadcast %s (epoch %s)", bid, epoch)
            entry = self.active.get(bid) or claims.Active(epoch, rate_limit)
            # the same object: loops in the middle of a claim update the live entry
            entry.epoch, entry.rate_limit = epoch, rate_limit
            # every broadcast gets a look at each refresh: a process kept busy by another
            # broadcast would otherwise never come back to one whose claim once came back
            # empty (its retries' time has come since, or its rows were put back)
            entry.empty = False
            fresh[bid] = entry
        for gone in self.active.keys() - fresh.keys():
            self.forget(gone)
        self.active = fresh
        self._order = list(fresh)
        self._refreshed = time.monotonic()
        self._content = {k: v for k, v in self._content.items() if k in fresh}

    async def pick(self, woken: bool) -> uuid.UUID | None:
        """The next broadcast in round-robin order that has not just come back empty nor is
        backing off from an unexpected error (`woken`: LISTEN said something changed)."""
        if woken or time.monotonic() - self._refreshed > self.poll:
            await self.refresh()
        n = len(self._order)
        now = time.monotonic()
        for i in range(n):
            bid = self._order[(self._next + i) % n]
            entry = self.active.get(bid)
            if entry is not None and not entry.empty and entry.not_before <= now:
                self._next = (self._next + i + 1) % max(1, n)
                return bid
        return None

    def look_again(self) -> None:
        """After a quiet poll interval every broadcast deserves another look."""
        for entry in self.active.values():
            entry.empty = False
        self._refreshed = 0.0

    async def content(self, bid: uuid.UUID) -> render.Content | str:
        """The broadcast's content, or why it cannot be built (each recipient then fails)."""
        content = self._content.get(bid)
        if content is None:
            rows = await self.db.dicts("broadcast_content", {"id": bid})
            assert rows  # recipient rows reference their broadcast
            row = rows[0]
            try:
                content = render.Content.from_row(row)
            except Exception as exc:  # noqa: BLE001 - tenant data: the recipients fail
                log.warning("broadcast %s: its content cannot be built: %s", bid, exc)
                content = dispatch.describe(exc)
            self._content[bid] = content
        return content
