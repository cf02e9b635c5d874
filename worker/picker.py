"""Which broadcast a dispatch loop works on next, and what it says.

The sending broadcasts come from the database at most once a poll interval (or at once when
LISTEN says something changed), furthest below their fair share of the global rate first
(query `active_broadcasts`), at most --max-broadcasts of them. Loops take them by stride
scheduling: next is the one that has had the fewest rows claimed over its weight (its fair
share, capped by its own rate limit), so each broadcast's claims follow its share. Round
robin would claim as many rows of each, and no share of the tokens could then make a
priority-3 broadcast go faster than its siblings.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from pgcast.mail import tracking, unsubscribe
from pgcast.worker import claims, dispatch, pg, render

log = logging.getLogger("pgcast.worker")


class Picker:
    """The broadcasts one process works on, taken by its loops in stride order."""

    def __init__(self, db: pg.Db, rates: dict[str, float], max_broadcasts: int, poll: float,
                 forget: Callable[[uuid.UUID], None]) -> None:
        self.db = db
        self.rates = rates
        self.max_broadcasts = max_broadcasts
        self.poll = poll
        self.forget = forget  # a broadcast no longer worked on (its takers' state goes)
        self.active: dict[uuid.UUID, claims.Active] = {}
        self._order: list[uuid.UUID] = []
        self._next = 0
        self._refreshed = -math.inf  # never: monotonic() counts from boot
        self._content: dict[uuid.UUID, render.Content | str] = {}
        # the stride clock: `claimed` of the latest pick; a broadcast that starts, or comes
        # back after its claims came back empty, starts here (no credit for the time away)
        self._clock = 0.0

    async def refresh(self) -> None:
        """Read the sending broadcasts and the global bucket again."""
        rows = await self.db.q("active_broadcasts")
        bucket = await self.db.q("rate_get", {"name": "global"})
        if bucket:
            self.rates["global"] = float(bucket[0][1])
        limit = self.max_broadcasts or len(rows)
        fresh: dict[uuid.UUID, claims.Active] = {}
        for bid, epoch, rate_limit, share in rows[:limit]:
            if bid not in self.active:
                log.info("working on broadcast %s (epoch %s)", bid, epoch)
            entry = self.active.get(bid) or claims.Active(epoch, rate_limit, claimed=self._clock)
            entry.share = float(share)
            if entry.empty:
                entry.claimed = max(entry.claimed, self._clock)
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
        """The broadcast furthest behind its share of this process's claims that has not just
        come back empty nor is backing off from an unexpected error; ties in round-robin
        order (`woken`: LISTEN said something changed)."""
        if woken or time.monotonic() - self._refreshed > self.poll:
            await self.refresh()
        n = len(self._order)
        now = time.monotonic()
        best: tuple[float, int] | None = None  # (its claimed rows over weight, position)
        for i in range(n):
            entry = self.active.get(self._order[(self._next + i) % n])
            if (entry is not None and not entry.empty and entry.not_before <= now
                    and (best is None or entry.claimed < best[0])):
                best = (entry.claimed, (self._next + i) % n)
        if best is None:
            return None
        self._next = (best[1] + 1) % n
        self._clock = max(self._clock, best[0])
        return self._order[best[1]]

    def claimed(self, bid: uuid.UUID, rows: int) -> None:
        """A loop claims `rows` of the broadcast: it moves on by rows over its weight. Charged
        for the claim's size when it starts, so loops picking at once spread over the
        broadcasts, and corrected by what it got (negative rows) when it returns."""
        entry = self.active.get(bid)
        if entry is None or rows == 0:
            return
        weight = entry.share
        rate = self.rates.get("global", 0.0)
        if entry.rate_limit and rate > 0:
            weight = min(weight, entry.rate_limit / rate)  # it cannot use more than its cap
        entry.claimed += rows / max(weight, 1e-6)

    def look_again(self) -> None:
        """After a quiet poll interval every broadcast deserves another look."""
        for entry in self.active.values():
            if entry.empty:
                entry.claimed = max(entry.claimed, self._clock)
            entry.empty = False
        self._refreshed = -math.inf

    async def content(self, bid: uuid.UUID) -> render.Content | str:
        """The broadcast's content, or why it cannot be built (each recipient then fails)."""
        content = self._content.get(bid)
        if content is None:
            rows = await self.db.dicts("broadcast_content", {"id": bid})
            assert rows  # recipient rows reference their broadcast
            row = rows[0]
            try:
                if row.get("track", "none") != "none":
                    row = {**row, "links": await self.links(bid, row)}
                content = render.Content.from_row(row)
            except Exception as exc:  # noqa: BLE001 - tenant data: the recipients fail
                log.warning("broadcast %s: its content cannot be built: %s", bid, exc)
                content = dispatch.describe(exc)
            self._content[bid] = content
        return content

    async def links(self, bid: uuid.UUID, row: dict[str, Any]) -> tuple[str, ...]:
        """The broadcast's tracked links by index: stored by the first worker to get here
        (pgcast_links_store_v1), read back by every one (the same index in every message)."""
        base_url = unsubscribe.public_url(os.environ.get("PGCAST_PUBLIC_URL"))
        # the templates are tenant data: parsed off the event loop
        urls = await asyncio.to_thread(tracking.links_of, row["html_body"], row["text_body"],
                                       base_url)
        stored = await self.db.dicts("tracking_links_store", {"id": bid, "urls": urls})
        by_index = ["\x00"] * (max((int(r["idx"]) for r in stored), default=-1) + 1)
        for r in stored:  # a gap (never made by one version) matches no URL
            by_index[int(r["idx"])] = r["url"]
        return tuple(by_index)
