"""The rate limit in one process: tokens from the buckets per group before its handoff, and
the pacing of the calls that follow.

Tokens come from Postgres (pgcast_take_tokens_v3): a broadcast's own bucket, then the global
one, which shares itself fairly between accounts and between an account's broadcasts. A group
takes its window slots (worker.inflight) together with its tokens and gives them back while it
waits, so a loop waiting on the bucket never keeps another broadcast's group out of the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable

from pgcast.worker import pg

WAIT_MIN = 0.005  # seconds: the shortest sleep on an empty bucket (never a busy loop)
WAIT_MAX = 1.0  # seconds: the longest, so a rate change or a stop is seen soon
GATHER = 0.025  # seconds of tokens an empty bucket is left to gather before the next take

Acquire = Callable[[int], Awaitable[int]]  # between 1 and n window slots, once one is free
Release = Callable[[int], None]


class Buckets:
    """Takes tokens for one group at a time; an empty bucket is waited on, not polled hot."""

    def __init__(self, db: pg.Db, rates: dict[str, float], stopping: asyncio.Event,
                 halted: Callable[[uuid.UUID, int], bool]) -> None:
        self.db = db
        # one taker per bucket and broadcast at a time in this process: loops polling an
        # empty bucket side by side would split each refill into groups of one or two (a
        # handoff and a record per one or two messages: measured 3.6-4.5 rows per group at
        # 200/s with 4 loops); per broadcast, so one that waits for its fair share never
        # keeps another broadcast's taker from the bucket
        self._takers: dict[tuple[str, uuid.UUID], asyncio.Lock] = {}
        self.rates = rates  # bucket -> rate, kept current by the control listener
        self.stopping = stopping
        self.halted = halted

    def global_rate(self) -> float:
        """The global rate as last heard (0 = unlimited; 1 until heard: assume a limit)."""
        return self.rates.get("global", 1.0)

    async def take(self, bid: uuid.UUID, epoch: int, rate_limit: float | None, want: int,
                   acquire: Acquire, release: Release) -> int:
        """Tokens for up to `want` emails from the broadcast's and the global bucket, and as
        many window slots (held by the caller from here on; 0: stopped or halted)."""
        own = want
        if rate_limit:
            # its own bucket has one taker: first come, first served
            own = await self._take_from(f"broadcast:{bid}", bid, epoch, want, rate_limit, None)
        if not own:
            return 0
        granted = 0
        try:
            if self.global_rate() == 0:
                granted = await acquire(own)
            else:
                granted = await self._take_from("global", bid, epoch, own, self.global_rate(),
                                                bid, acquire, release)
        finally:
            if rate_limit and granted < own:
                # the global bucket (its share) or the window granted fewer: what the cap
                # allowed and nobody used goes back to it, or the cap would be under-used
                await self.db.q_retry("give_back_tokens", {"name": f"broadcast:{bid}",
                                                           "tokens": own - granted})
        return granted

    async def _take_from(self, bucket: str, bid: uuid.UUID, epoch: int, want: int,
                         rate: float, share: uuid.UUID | None,
                         acquire: Acquire | None = None, release: Release | None = None) -> int:
        # empty: wait for the first token and GATHER seconds' worth more (never more than the
        # smallest default burst holds, so a late wake-up loses no refill); ahead of a waiting
        # peer: the wait already runs to a nearly full bucket, and later would lose refill
        gather = max(0, min(want, math.floor(rate * GATHER)) - 1) / rate if rate > 0 else 0.0
        async with self._takers.setdefault((bucket, bid), asyncio.Lock()):
            # a halted broadcast's loop stops waiting: its tokens would be wasted
            while not self.stopping.is_set() and not self.halted(bid, epoch):
                slots = await acquire(want) if acquire is not None else want
                granted = 0
                try:
                    rows = await self.db.q("take_tokens", {"name": bucket, "want": slots,
                                                           "broadcast": share})
                    granted, wait, ahead = int(rows[0][0]), float(rows[0][1]), bool(rows[0][2])
                finally:
                    if release is not None:
                        release(slots - granted)
                if granted:
                    return granted
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=min(
                        WAIT_MAX, max(WAIT_MIN, wait + (0.0 if ahead else gather))))
        return 0

    def forget(self, bid: uuid.UUID) -> None:
        """A broadcast no longer worked on: drop its takers' locks (none is held)."""
        for key in [k for k, lock in self._takers.items() if k[1] == bid and not lock.locked()]:
            del self._takers[key]


class Pacer:
    """Spaces one process's provider calls at least 1 / rate apart, at the global rate
    (thread-safe).

    The bucket's grants never exceed rate x t + burst, but a grant reaches the provider one
    handoff commit and one thread hand-off later, and that delay varies: calls whose grants
    came at an even pace could arrive together. Calls pass here last, just before the
    provider: whatever delayed them, they leave one every 1 / rate at most, so any second
    holds at most rate + 1 of them, and the bucket's burst is left for the time between here
    and the provider (GCRA, the virtual-scheduling form, with no tolerance). The average is
    the bucket's: grants run at most a burst ahead of the pacer (plus the bunching it
    smooths), so a call waits here about burst / rate at most.
    """

    def __init__(self, rate: Callable[[], float]) -> None:
        self.rate = rate
        # theoretical arrival time of the next call (monotonic seconds); -inf: none booked yet
        # (monotonic() counts from boot: 0.0 would be a real time on a machine just booted)
        self._tat = -math.inf
        self._lock = threading.Lock()

    def delay(self) -> float:
        """Book the next call; the seconds it must wait before it goes (0: at once)."""
        rate = self.rate()
        if not rate > 0 or not math.isfinite(rate):
            return 0.0
        now = time.monotonic()
        with self._lock:
            go = max(now, self._tat)
            self._tat = go + 1.0 / rate
        return go - now

    def wait(self) -> float:
        """Book the next call and sleep until it may go; the seconds slept."""
        seconds = self.delay()
        if seconds > 0:
            time.sleep(seconds)
        return seconds
