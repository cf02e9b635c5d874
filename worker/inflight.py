"""How much one process puts in the provider's hands: group sizes and the in-flight window."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time

GROUP_START = 10  # auto group size before the provider's speed has been measured
GROUP_ALPHA = 0.2  # weight of the newest group in the provider's moving average
LATENCY_ALPHA = 0.1  # weight of the newest call in the window's latency average
HEADROOM = 1.5  # calls in flight per call Little's law asks for (records, jitter, refills)
SPARE = 4  # calls in flight beyond Little's law: a group and a bit while the estimate settles
STUCK = 4.0  # a slot held this many times the typical hold is the latency tail's, not the rate's


class GroupSizer:
    """How many rows the next group hands off: a fixed number, or sized to the provider.

    Auto: the provider's seconds per message is an exponentially weighted moving average
    over groups (the first measurement replaces the starting guess), and a group is what
    fits in `group_ms` of provider time: floor(group_ms / 1000 / average), clamped to
    [1, batch_size]. Fast providers get few big groups (fewer synchronous commits); slow ones
    small groups. `seconds` is the time the provider spent on the group's calls, added up
    (calls run side by side, so this is not the group's wall time).
    """

    def __init__(self, fixed: int | None, group_ms: float, batch_size: int,
                 start: int = GROUP_START, alpha: float = GROUP_ALPHA) -> None:
        if fixed is not None and fixed < 1:
            raise ValueError(f"group size must be at least 1, not {fixed}")
        if not (math.isfinite(group_ms) and group_ms > 0):
            raise ValueError(f"group_ms must be a finite number > 0, not {group_ms}")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], not {alpha}")
        self.fixed = fixed
        self.target = group_ms / 1000
        self.batch_size = batch_size
        self.start = start
        self.alpha = alpha
        self.per_message: float | None = None  # seconds; None until the first measurement
        self._lock = threading.Lock()

    def size(self) -> int:
        """Rows for the next group (before the window and the rate limit have their say)."""
        if self.fixed is not None:
            return self.fixed
        avg = self.per_message
        if avg is None:
            want = float(self.start)
        elif avg <= 0:
            want = float(self.batch_size)
        else:
            want = self.target / avg  # inf when avg is subnormal: clamped before floor()
        return max(1, math.floor(min(float(self.batch_size), want)))

    def observe(self, seconds: float, messages: int) -> None:
        """The provider spent `seconds` on `messages` attempted sends."""
        if self.fixed is not None or messages < 1 or not math.isfinite(seconds):
            return
        sample = max(0.0, seconds) / messages
        with self._lock:
            old = self.per_message
            self.per_message = sample if old is None else old + self.alpha * (sample - old)


class Window:
    """Provider calls in flight in one process: about rate x latency (Little's law).

    A slot is taken before a group's tokens and handoff, and each call's slot is given back
    when that call's outcome is recorded (worker.recorder), whatever the rest of its group
    does: the slots in use bound what a crash of this process can leave `unknown`, and a slow
    call holds one slot, not its group's. The limit is ceil(rate x typical x HEADROOM) + SPARE
    + stuck, with the global rate, the typical time a slot is held (a moving average of the
    holds, each clipped at STUCK x the average: the tail does not inflate it), and the calls
    held longer than STUCK x typical right now (the tail, counted as it happens rather than
    averaged after it: together the window follows the mean time a slot is held). The most
    when nothing is measured or the rate is unlimited; never above `most` (--max-in-flight)
    nor above `cap`: a throttle halves `cap`, and each successful call grows it by 1/cap
    (additive increase, multiplicative decrease). Event-loop only.
    """

    def __init__(self, most: int) -> None:
        if most < 1:
            raise ValueError(f"max in flight must be at least 1, not {most}")
        self.most = most
        self.cap = float(most)
        self.used = 0
        self.latency: float | None = None  # seconds a slot is typically held, moving average
        self._changed = asyncio.Event()
        self._held: dict[int, float] = {}  # call -> time.monotonic() its slot was taken
        self._calls = itertools.count()

    def stuck(self, now: float | None = None) -> int:
        """Calls holding their slot longer than STUCK x the typical hold, right now."""
        if self.latency is None or not self._held:
            return 0
        since = (time.monotonic() if now is None else now) - STUCK * self.latency
        return sum(1 for t in self._held.values() if t < since)

    def limit(self, rate: float) -> int:
        """Calls allowed in flight right now, at this global rate (0 = unlimited)."""
        want = self.most
        if rate > 0 and self.latency is not None:
            want = min(want, math.ceil(rate * self.latency * HEADROOM) + SPARE + self.stuck())
        return max(1, min(want, math.floor(self.cap)))

    def free(self, rate: float) -> int:
        """Slots free right now."""
        return max(0, self.limit(rate) - self.used)

    async def acquire(self, want: int, rate: float) -> int:
        """Between 1 and `want` slots, as many as are free, once at least one is."""
        while True:
            free = self.free(rate)
            if free > 0:
                n = min(want, free)
                self.used += n
                return n
            self._changed.clear()
            # a call held long enough becomes `stuck` and widens the window by itself
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._recheck())

    def _recheck(self) -> float | None:
        """Seconds until a held call may turn stuck (None: a release will tell)."""
        if self.latency is None or not self._held:
            return None
        return max(0.01, STUCK * self.latency / 2)

    def release(self, n: int) -> None:
        """Give back slots."""
        if n > 0:
            self.used -= n
            self._changed.set()

    def hold(self, since: float) -> int:
        """A call now holds one of the slots taken at `since` (time.monotonic()); its id."""
        call = next(self._calls)
        self._held[call] = since
        return call

    def settle(self, call: int, observe: bool = True) -> None:
        """A held call's outcome is recorded: its slot is free (observed, unless `observe` is
        False: the call was abandoned, its hold says nothing about the provider)."""
        since = self._held.pop(call, None)
        if since is not None and observe:
            self.observe(time.monotonic() - since)
        self.release(1)

    def observe(self, seconds: float) -> None:
        """A slot was held `seconds` (tokens, handoff, the call, the record)."""
        if math.isfinite(seconds) and seconds >= 0:
            old = self.latency
            if old is None:
                self.latency = seconds
            else:
                sample = min(seconds, STUCK * old)  # the tail is counted by stuck(), not here
                self.latency = old + LATENCY_ALPHA * (sample - old)

    def succeeded(self, calls: int) -> None:
        """Calls went through: grow the cap back towards `most` (a step per call; none once
        it is there, where a drain spends its groups: issue 32)."""
        most, cap = float(self.most), self.cap
        for _ in range(calls):
            if cap >= most:
                cap = most
                break
            cap = min(most, cap + 1 / cap)
        self.cap = cap
        self._changed.set()

    def throttled(self) -> None:
        """The provider asked us to slow down: halve the cap (at least one call)."""
        self.cap = max(1.0, self.cap / 2)

    def rows_per_second(self, rate: float) -> float:
        """What this process can send: the window's slots that are not stuck over the typical
        hold, and the rate (inf: no measurement and no limit)."""
        best = math.inf
        if rate > 0:
            best = rate
        if self.latency is not None and self.latency > 0:
            best = min(best, max(1, self.limit(rate) - self.stuck()) / self.latency)
        return best
