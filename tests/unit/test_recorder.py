"""No head-of-line blocking: each answered call is recorded and frees its slot without waiting
for the rest of its group, and the window counts a slow call as one slot of the tail."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import pytest

from pgcast.worker import dispatch, inflight, recorder

KEY = (uuid.uuid4(), 1, uuid.uuid4())


def outcome(cid: int) -> dispatch.Outcome:
    return dispatch.Outcome(cid, "sent", message_id=f"m{cid}", seconds=0.1)


def test_answered_calls_are_recorded_and_free_their_slots_while_a_slow_one_runs() -> None:
    async def run() -> None:
        window = inflight.Window(10)
        written: list[list[int]] = []
        wrote = asyncio.Event()

        async def write(key: recorder.Key, outcomes: list[dispatch.Outcome]) -> None:
            assert key == KEY
            written.append([o.contact_id for o in outcomes])
            wrote.set()

        rec = recorder.Recorder(write, window, wait=0.01)
        assert await window.acquire(5, 0) == 5
        group = rec.group(KEY, 5, time.monotonic())
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(5)]
        for f in futures:
            f.add_done_callback(group.answered)
        for cid, f in enumerate(futures[:4]):
            f.set_result(outcome(cid))
        await asyncio.wait_for(wrote.wait(), 5)  # the four, without waiting for the fifth
        assert sorted(c for batch in written for c in batch) == [0, 1, 2, 3]
        assert window.used == 1 and not group.done.done()
        futures[4].set_result(outcome(4))
        await asyncio.wait_for(group.done, 5)
        assert window.used == 0 and written[-1] == [4]
        await rec.drain()

    asyncio.run(run())


def test_a_complete_group_is_recorded_at_once_in_one_statement() -> None:
    async def run() -> list[list[int]]:
        window = inflight.Window(10)
        written: list[list[int]] = []

        async def write(key: recorder.Key, outcomes: list[dispatch.Outcome]) -> None:
            written.append([o.contact_id for o in outcomes])

        rec = recorder.Recorder(write, window, wait=3600.0)  # only completeness flushes
        await window.acquire(3, 0)
        group = rec.group(KEY, 3, time.monotonic())
        loop = asyncio.get_running_loop()
        for cid in range(3):
            f: asyncio.Future[dispatch.Outcome] = loop.create_future()
            f.add_done_callback(group.answered)
            f.set_result(outcome(cid))
        await asyncio.wait_for(group.done, 5)
        assert window.used == 0
        return written

    assert asyncio.run(run()) == [[0, 1, 2]]


def test_an_abandoned_call_frees_its_slot_and_is_not_recorded() -> None:
    async def run() -> tuple[int, list[int]]:
        window = inflight.Window(4)
        written: list[int] = []

        async def write(key: recorder.Key, outcomes: list[dispatch.Outcome]) -> None:
            written.extend(o.contact_id for o in outcomes)

        rec = recorder.Recorder(write, window, wait=0.0)
        await window.acquire(2, 0)
        group = rec.group(KEY, 2, time.monotonic())
        loop = asyncio.get_running_loop()
        a: asyncio.Future[dispatch.Outcome] = loop.create_future()
        b: asyncio.Future[dispatch.Outcome] = loop.create_future()
        a.add_done_callback(group.answered)
        b.add_done_callback(group.answered)
        a.set_result(outcome(1))
        b.cancel()
        await asyncio.wait_for(group.done, 5)
        await rec.drain()
        return window.used, written

    assert asyncio.run(run()) == (0, [1])


def test_a_call_held_far_longer_than_typical_widens_the_window_by_one() -> None:
    w = inflight.Window(128)
    for _ in range(50):
        w.observe(0.1)
    base = math.ceil(200 * 0.1 * inflight.HEADROOM) + inflight.SPARE
    assert w.limit(200) == base
    now = time.monotonic()
    w.hold(now)  # just taken: typical so far
    slow = [w.hold(now - 10.0) for _ in range(3)]  # out for 10 s, typical 0.1 s
    assert w.stuck() == 3 and w.limit(200) == base + 3
    for call in slow:
        w.settle(call)
    # their 10 s did not inflate the typical hold: each counted at most STUCK x typical
    assert w.latency is not None and w.latency < 0.1 * inflight.STUCK
    assert w.stuck() == 0


def test_the_typical_hold_still_follows_a_provider_that_got_slower() -> None:
    w = inflight.Window(128)
    for _ in range(50):
        w.observe(0.1)
    for _ in range(60):
        w.observe(1.0)
    assert w.latency == pytest.approx(1.0, rel=0.05)


def test_a_waiter_wakes_when_a_held_call_turns_stuck() -> None:
    """No release comes while slow calls hold every slot: acquire looks again by itself."""
    async def run() -> int:
        w = inflight.Window(100)
        for _ in range(50):
            w.observe(0.01)  # typical 10 ms: limit at 200/s is ceil(3) + 4 = 7
        got = await w.acquire(7, 200)
        assert got == 7
        for _ in range(7):
            w.hold(time.monotonic())
        return await asyncio.wait_for(w.acquire(1, 200), 5)  # stuck after 40 ms

    assert asyncio.run(run()) == 1
