"""Tokens from the global bucket and a broadcast's own bucket, per group, before its handoff."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Callable

from worker import pg

WAIT_MIN = 0.005  # seconds: the shortest sleep on an empty bucket (never a busy loop)
WAIT_MAX = 1.0  # seconds: the longest, so a rate change or a stop is seen soon
GATHER = 0.025  # seconds of tokens an empty bucket is left to gather before the next take


class Buckets:
    """Takes tokens for one group at a time; an empty bucket is waited on, not polled hot."""

    def __init__(self, db: pg.Db, rates: dict[str, float], stopping: asyncio.Event,
                 halted: Callable[[uuid.UUID, int], bool]) -> None:
        self.db = db
        # one taker per bucket at a time in this process: loops polling an empty bucket side
        # by side would split each refill into groups of one or two (a handoff and a record
        # per one or two messages: measured 3.6-4.5 rows per group at 200/s with 4 loops)
        self._takers: dict[str, asyncio.Lock] = {}
        self.rates = rates  # bucket -> rate, kept current by the control listener
        self.stopping = stopping
        self.halted = halted

    def global_rate(self) -> float:
        """The global rate as last heard (0 = unlimited; 1 until heard: assume a limit)."""
        return self.rates.get("global", 1.0)

    async def take(self, bid: uuid.UUID, epoch: int, rate_limit: float | None,
                   want: int) -> int:
        """Tokens for up to `want` emails from the broadcast's and the global bucket."""
        granted = want
        if rate_limit:
            granted = await self._take_from(f"broadcast:{bid}", bid, epoch, granted, rate_limit)
        if granted and self.global_rate() != 0:
            granted = await self._take_from("global", bid, epoch, granted, self.global_rate())
        return granted

    async def _take_from(self, bucket: str, bid: uuid.UUID, epoch: int, want: int,
                         rate: float) -> int:
        # empty: wait for the first token and GATHER seconds' worth more (never more than the
        # smallest default burst holds, so a late wake-up loses no refill)
        gather = max(0, min(want, math.floor(rate * GATHER)) - 1) / rate if rate > 0 else 0.0
        async with self._takers.setdefault(bucket, asyncio.Lock()):
            # a halted broadcast's loop stops waiting: its tokens would be wasted
            while not self.stopping.is_set() and not self.halted(bid, epoch):
                rows = await self.db.q("take_tokens", {"name": bucket, "want": want})
                granted, wait = rows[0]
                if granted:
                    return int(granted)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=min(
                        WAIT_MAX, max(WAIT_MIN, float(wait) + gather)))
        return 0
