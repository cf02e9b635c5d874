"""The rate limit in one process: tokens from the buckets per group before its handoff, and
the pacing of the calls that follow.

Tokens come from Postgres: a broadcast's own bucket in batches of half its burst
(pgcast_take_own_v1), then the global one (pgcast_take_tokens_v5), which shares itself fairly
between accounts and between an account's broadcasts. A group takes its window slots
(worker.inflight) together with its tokens and gives them back while it waits, so a loop
waiting on the bucket never keeps another broadcast's group out of the window.
The global bucket's take also books the group's wire slots in the one schedule that every
process and host shares (Schedule); the pacer holds each call until its slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pgcast.worker import errors, pg

WAIT_MIN = 0.005  # seconds: the shortest sleep on an empty bucket (never a busy loop)
WAIT_MAX = 1.0  # seconds: the longest, so a rate change or a stop is seen soon
GATHER = 0.025  # seconds of tokens an empty bucket is left to gather before the next take

Acquire = Callable[[int], Awaitable[int]]  # between 1 and n window slots, once one is free
Release = Callable[[int], None]

LEAD_FIRST = 0.05  # seconds: a process's lead until it has measured its own
LEAD_MIN = 0.005  # seconds: the shortest lead it asks for
LEAD_MAX = 0.5  # seconds: the longest (a starved process is late rather than slow to start)
LEAD_MARGIN = 1.25  # the lead asked: this times the LEAD_QUANTILE of recent grant-to-wire times
LEAD_QUANTILE = 0.99  # a call slower than that is late, and put back beyond the burst's slack
LEAD_SAMPLES = 512  # the recent calls the quantile is taken over
LEAD_EVERY = 0.25  # seconds: how often the quantile is computed again
# the share of the burst's slack ((burst - 1) / rate) a call may be late for its slot before it
# is put back instead of sent. Off (inf): with 0.5, a process slower than the rate (one worker,
# 1,000/s, a slow endpoint: tests/acceptance/test_chaos.py) put its late calls back, claimed
# them again and was late again, and never finished; late calls now go at once
LATE_SHARE = math.inf
CLOCK_WINDOW = 10.0  # seconds: how long the best clock reading is kept (two windows)


@dataclass(frozen=True)
class Slots:
    """A grant's wire slots on this process's monotonic clock: the i-th call of the group may
    reach the wire at first + i x spacing, not before. `since`: when the grant was made, on
    the same clock (the lead a call needed is measured from it)."""

    first: float
    spacing: float
    since: float
    late_max: float = math.inf  # seconds a call may be late for its slot and still be made
    burst: float = math.inf  # the bucket's burst: the most messages one call may carry

    def at(self, i: int) -> Slot:
        """The i-th call's slot (from 0)."""
        return Slot(self.first + i * self.spacing, self.since + i * self.spacing,
                    self.late_max)


@dataclass(frozen=True)
class Slot:
    """One call's slot: `at` its time, `since` the moment it would be at with no lead;
    `late_max`: later than at + late_max, the call is not made (too_late)."""

    at: float
    since: float
    late_max: float = math.inf

    def too_late(self, now: float) -> bool:
        """Past its slot by more than LATE_SHARE of the lateness the bucket's burst absorbs:
        made now, it could share a second with other processes' calls beyond rate + burst."""
        return now > self.at + self.late_max


class WindowedMax:
    """The largest (or, negated, smallest) sample of the last one to two windows."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._cur = -math.inf
        self._prev = -math.inf
        self._since = -math.inf

    def add(self, now: float, sample: float) -> float:
        """Add a sample taken at `now`; the largest of the last one to two windows."""
        if now - self._since > self.window:
            self._prev = self._cur if now - self._since <= 2 * self.window else -math.inf
            self._cur = -math.inf
            self._since = now
        self._cur = max(self._cur, sample)
        return max(self._cur, self._prev)

    def value(self, now: float) -> float:
        """The largest of the last one to two windows (-inf: none)."""
        if now - self._since > 2 * self.window:
            return -math.inf
        if now - self._since > self.window:
            return self._cur
        return max(self._cur, self._prev)


class Schedule:
    """This process's view of the global wire schedule (pgcast_take_tokens_v5 and
    pgcast_take_tokens_messages_v2 book the slots in Postgres, under the bucket's lock).

    A take answers with its first slot as an offset from the database's clock_timestamp()
    and that clock itself. The database's clock maps to this process's monotonic clock by
    the smallest (received - taken_at) of the last CLOCK_WINDOW seconds: every reading is
    late by the answer's trip and the event loop's delay, never early, and the best of them
    is late by the least (no clock sync between hosts is needed: both clocks only have to
    run at the same speed). The lead this process asks for is LEAD_MARGIN times the 99th
    percentile of the time its last LEAD_SAMPLES calls took from their grant to the wire
    (its handoff commit, its render, its thread), within LEAD_MIN..LEAD_MAX, so its calls
    wait for their slots instead of arriving late (the slowest 1 % can be late)."""

    def __init__(self) -> None:
        self._clock = WindowedMax(CLOCK_WINDOW)  # of -(received - taken_at)
        self._need: collections.deque[float] = collections.deque(maxlen=LEAD_SAMPLES)
        self._lead = LEAD_FIRST
        self._lead_at = -math.inf  # when _lead was computed (monotonic)
        self._lock = threading.Lock()
        self.late = 0  # calls that reached the wire after their slot
        self.latest = 0.0  # the most seconds one was late
        self.most_lead = 0.0  # the longest lead asked (seconds)
        self.recent: collections.deque[float] = collections.deque(maxlen=10_000)  # grant-to-wire

    def lead(self) -> float:
        """Seconds ahead of now this process's next first slot should be, at the earliest."""
        now = time.monotonic()
        if now - self._lead_at >= LEAD_EVERY:
            with self._lock:
                need = sorted(self._need)
            if need:
                q = need[min(len(need) - 1, int(LEAD_QUANTILE * len(need)))]
                self._lead = min(LEAD_MAX, max(LEAD_MIN, q * LEAD_MARGIN))
                self._lead_at = now
        self.most_lead = max(self.most_lead, self._lead)
        return self._lead

    def slots(self, offset: Any, spacing: Any, taken_at: Any, received: float,
              slack: Any = None) -> Slots | None:
        """A take's answer (slot_offset, slot_spacing, taken_at, slot_slack) as slots on this
        process's clock; None when the take booked none (no limit). A call may be late for
        its slot by LATE_SHARE of the slack (the rest is for the clocks' mapping and the time
        from the check to the wire)."""
        if offset is None or spacing is None or taken_at is None:
            return None
        with self._lock:
            best = -self._clock.add(received, -(received - float(taken_at)))
        since = float(taken_at) + best
        # the slack is (burst - 1) / rate, the spacing 1 / rate
        burst = math.inf if slack is None or not float(spacing) > 0 else \
            1 + round(float(slack) / float(spacing))
        return Slots(since + float(offset), float(spacing), since,
                     math.inf if slack is None else float(slack) * LATE_SHARE, burst)

    def figures(self) -> dict[str, float]:
        """For the worker's exit line: calls late at the wire, the most one was (ms), the
        longest lead asked (ms), and percentiles of the recent grant-to-wire times (ms)."""
        with self._lock:
            recent = sorted(self.recent)
        out = {"late": float(self.late), "latest_ms": round(self.latest * 1000, 1),
               "most_lead_ms": round(self.most_lead * 1000, 1)}
        for q in (50, 90, 99) if recent else ():
            out[f"to_wire_p{q}_ms"] = round(1000 * recent[int(q / 100 * (len(recent) - 1))], 1)
        return out

    def arrived(self, slot: Slot, now: float) -> None:
        """A call reached the wire at `now`, before waiting for its slot."""
        with self._lock:
            self._need.append(now - slot.since)
            self.recent.append(now - slot.since)
            if now > slot.at:
                self.late += 1
                self.latest = max(self.latest, now - slot.at)


_CALL = threading.local()  # the slot of the call this provider thread is making
TOO_LATE = "not called: too late for its slot in the rate limit's schedule"


@contextlib.contextmanager
def on_this_thread(slot: Slot | None) -> Iterator[None]:
    """The slot of the call this thread makes inside the block (None: it has none); the
    pacer reads it where the call leaves (the provider's own hook for ses)."""
    _CALL.slot, _CALL.arrived = slot, False
    try:
        yield
    finally:
        _CALL.slot = None


@contextlib.contextmanager
def carrying(n: int) -> Iterator[None]:
    """The call this thread makes inside the block carries n messages (SendBulkEmail): the
    pacer books n messages' time for it (with a wire slot it waits for that slot, its first
    message's: the take booked the others' slots already)."""
    before = getattr(_CALL, "count", 1)
    _CALL.count = n
    try:
        yield
    finally:
        _CALL.count = before


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
        self.schedule = Schedule()  # the global wire schedule, seen from this process

    def global_rate(self) -> float:
        """The global rate as last heard (0 = unlimited; 1 until heard: assume a limit)."""
        return self.rates.get("global", 1.0)

    async def take(self, bid: uuid.UUID, epoch: int, rate_limit: float | None, want: int,
                   acquire: Acquire, release: Release) -> int:
        """Tokens for up to `want` emails from the broadcast's and the global bucket, and as
        many window slots (held by the caller from here on; 0: stopped or halted)."""
        return (await self.grant(bid, epoch, rate_limit, want, acquire, release))[0]

    async def grant(self, bid: uuid.UUID, epoch: int, rate_limit: float | None, want: int,
                    acquire: Acquire, release: Release) -> tuple[int, Slots | None]:
        """take(), and the wire slots the global bucket booked for the tokens (None: no
        global limit)."""
        own = want
        if rate_limit:
            own = await self._take_own(bid, epoch, want)
        if not own:
            return 0, None
        granted = 0
        slots: Slots | None = None
        try:
            if self.global_rate() == 0:
                granted = await acquire(own)
            else:
                granted, slots = await self._take_from("global", bid, epoch, own,
                                                       self.global_rate(), bid, acquire,
                                                       release)
        finally:
            if rate_limit and granted < own:
                # the global bucket (its share) or the window granted fewer: what the cap
                # allowed and nobody used goes back to it, or the cap would be under-used
                await self.db.q_retry("give_back_tokens", {"name": f"broadcast:{bid}",
                                                           "tokens": own - granted})
        return granted, slots

    async def _take_from(self, bucket: str, bid: uuid.UUID, epoch: int, want: int,
                         rate: float, share: uuid.UUID | None,
                         acquire: Acquire | None = None,
                         release: Release | None = None) -> tuple[int, Slots | None]:
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
                                                           "broadcast": share,
                                                           "lead": self.schedule.lead()})
                    received = time.monotonic()
                    granted, wait, ahead = int(rows[0][0]), float(rows[0][1]), bool(rows[0][2])
                finally:
                    if release is not None:
                        release(slots - granted)
                if granted:
                    return granted, self.schedule.slots(rows[0][3], rows[0][4], rows[0][5],
                                                        received, rows[0][6])
                await self._nap(wait + (0.0 if ahead else gather))
        return 0, None

    async def _take_own(self, bid: uuid.UUID, epoch: int, want: int) -> int:
        """Tokens from the broadcast's own bucket, first come, first served, in batches: none
        until it holds half its burst (or `want`), so that however many processes take from
        it, each take carries about half a burst and not the token or two that came due
        since the last (pgcast_take_own_v1). 0: stopped or halted."""
        bucket = f"broadcast:{bid}"
        async with self._takers.setdefault((bucket, bid), asyncio.Lock()):
            while not self.stopping.is_set() and not self.halted(bid, epoch):
                rows = await self.db.q("take_own_tokens", {"name": bucket, "want": want})
                granted, wait = int(rows[0][0]), float(rows[0][1])
                if granted:
                    return granted
                await self._nap(wait)
        return 0

    async def _nap(self, seconds: float) -> None:
        """An empty bucket's wait: `seconds`, held to WAIT_MIN..WAIT_MAX, or until the stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(),
                                   timeout=min(WAIT_MAX, max(WAIT_MIN, seconds)))

    def forget(self, bid: uuid.UUID) -> None:
        """A broadcast no longer worked on: drop its takers' locks (none is held)."""
        for key in [k for k, lock in self._takers.items() if k[1] == bid and not lock.locked()]:
            del self._takers[key]


class Pacer:
    """Holds each provider call until it may go (thread-safe): a call with a wire slot (the
    global schedule's, on_this_thread) until its slot; one without (no take booked it one)
    at least 1 / rate after this process's previous call of that kind, or n / rate after a
    call that carried n messages (carrying: one SendBulkEmail call of n entries).

    The slots of every process and host are spaced 1 / rate apart in one schedule
    (pgcast_take_tokens_v5), so calls that wait for theirs leave the processes no closer
    than that together: any second holds at most rate + 1 of them. A call late for its slot
    (its grant-to-wire time longer than its process's lead) goes at once: lateness is the
    only source of bunching, and the bucket's burst is left as slack for it.
    """

    def __init__(self, rate: Callable[[], float], schedule: Schedule | None = None) -> None:
        self.rate = rate
        self.schedule = schedule or Schedule()
        # theoretical arrival time of the next call (monotonic seconds); -inf: none booked yet
        # (monotonic() counts from boot: 0.0 would be a real time on a machine just booted)
        self._tat = -math.inf
        self._lock = threading.Lock()

    def delay(self, n: int | None = None) -> float:
        """Book the next call, of n messages (None: what `carrying` says, else 1); the
        seconds it must wait before it goes (0: at once)."""
        rate = self.rate()
        if not rate > 0 or not math.isfinite(rate):
            return 0.0
        now = time.monotonic()
        slot: Slot | None = getattr(_CALL, "slot", None)
        if slot is not None:
            if not getattr(_CALL, "arrived", False):  # a second pass (sesconn) is not measured
                _CALL.arrived = True
                self.schedule.arrived(slot, now)
            if slot.too_late(now):
                raise errors.NotCalled(TOO_LATE)
            return max(0.0, slot.at - now)
        count = n if n is not None else int(getattr(_CALL, "count", 1))
        with self._lock:
            go = max(now, self._tat)
            self._tat = go + max(1, count) / rate
        return go - now

    def wait(self, n: int | None = None) -> float:
        """Book the next call (of n messages, see delay) and sleep until it may go; the
        seconds slept. Raises NotCalled when the call is too late for its slot, before or
        after the sleep (a stalled thread wakes late): it must not be made."""
        seconds = self.delay() if n is None else self.delay(n)
        if seconds > 0:
            time.sleep(seconds)
            slot: Slot | None = getattr(_CALL, "slot", None)
            if slot is not None and slot.too_late(time.monotonic()):
                raise errors.NotCalled(TOO_LATE)
        return seconds
