"""Records answered provider calls as they come, in small batches per claim: a call's outcome
never waits for the rest of its group, so a slow call holds its own window slot, not the
group's (worker.inflight.Window)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pgcast.worker import dispatch, inflight

log = logging.getLogger("pgcast.worker")

RECORD_WAIT = 0.025  # seconds: the longest an answer waits for others to share its record

Key = tuple[uuid.UUID, int, uuid.UUID]  # broadcast, epoch, claim token: one record statement
Write = Callable[[Key, list[dispatch.Outcome]], Awaitable[None]]


@dataclass
class Group:
    """A handed-off group's calls: each holds a window slot until its outcome is recorded."""

    key: Key
    calls: list[int]  # the window's ids of the calls, one per handed-off row, in order
    recorder: Recorder
    done: asyncio.Future[None]  # set once every outcome of the group is recorded
    answered_n: int = 0
    recorded_n: int = 0

    def answered(self, future: asyncio.Future[dispatch.Outcome]) -> None:
        """A done-callback for each call's future (dispatch.Sender.send_group's `each`)."""
        call = self.calls[self.answered_n]
        self.answered_n += 1
        if future.cancelled() or future.exception() is not None:
            # abandoned (a stop cancelled the group): its row stays `sending` and the sweeper
            # makes it `unknown`; the slot is free, the hold says nothing about the provider
            self.recorder.window.settle(call, observe=False)
            self.recorded(1)
            return
        self.recorder.add(self, call, future.result())

    def recorded(self, n: int) -> None:
        """n of the group's outcomes are recorded (or abandoned)."""
        self.recorded_n += n
        if self.recorded_n >= len(self.calls) and not self.done.done():
            self.done.set_result(None)


@dataclass
class _Pending:
    group: Group
    call: int
    outcome: dispatch.Outcome
    at: float  # time.monotonic() it was answered


@dataclass
class _Batch:
    entries: list[_Pending] = field(default_factory=list)
    complete: asyncio.Event = field(default_factory=asyncio.Event)  # a group is all answered


class Recorder:
    """Per claim (broadcast, epoch, token): one writer at a time, which records what was
    answered when a group is complete or RECORD_WAIT after the oldest answer waiting, and
    then frees those calls' slots. Event-loop only."""

    def __init__(self, write: Write, window: inflight.Window, wait: float = RECORD_WAIT) -> None:
        self.write = write  # records one batch; never raises (the engine logs its errors)
        self.window = window
        self.wait = wait
        self._batches: dict[Key, _Batch] = {}
        self._writers: dict[Key, asyncio.Task[None]] = {}

    def group(self, key: Key, n: int, held_since: float) -> Group:
        """A group of n calls whose slots were taken at `held_since` (time.monotonic())."""
        calls = [self.window.hold(held_since) for _ in range(n)]
        return Group(key, calls, self, asyncio.get_running_loop().create_future())

    def add(self, group: Group, call: int, outcome: dispatch.Outcome) -> None:
        """One answered call, to be recorded with whatever else its claim has answered."""
        batch = self._batches.setdefault(group.key, _Batch())
        batch.entries.append(_Pending(group, call, outcome, time.monotonic()))
        if group.answered_n >= len(group.calls):
            batch.complete.set()
        if group.key not in self._writers:
            self._writers[group.key] = asyncio.create_task(self._writer(group.key),
                                                           name="record")

    async def _writer(self, key: Key) -> None:
        try:
            while (batch := self._batches.get(key)) is not None and batch.entries:
                left = batch.entries[0].at + self.wait - time.monotonic()
                if left > 0 and not batch.complete.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(batch.complete.wait(), left)
                del self._batches[key]  # what is answered from here on waits for the next
                try:
                    await self.write(key, [p.outcome for p in batch.entries])
                finally:
                    for p in batch.entries:
                        self.window.settle(p.call)
                        p.group.recorded(1)
        finally:
            del self._writers[key]

    async def drain(self) -> None:
        """Wait until every answer handed to the recorder is recorded."""
        while self._writers:
            await asyncio.gather(*list(self._writers.values()), return_exceptions=True)
