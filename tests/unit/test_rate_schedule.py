"""The worker's side of the global wire schedule (worker.ratelimit.Schedule, Slots, Pacer):
the slot arithmetic, the database clock's mapping to this process's clock, the lead, and the
pacer holding a call until its slot (fake clocks and a fake provider: unit ring only)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from typing import Any

import pytest

from pgcast.worker import dispatch, ratelimit, render
from tests.unit.test_inflight import CONTENT, Slow


def test_slots_are_spaced_from_the_first() -> None:
    slots = ratelimit.Slots(first=10.0, spacing=0.01, since=9.95)
    assert [slots.at(i).at for i in range(3)] == pytest.approx([10.0, 10.01, 10.02])
    assert slots.at(2).since == pytest.approx(9.97)


def test_the_database_clock_maps_by_the_fastest_recent_answer() -> None:
    """received - taken_at is the answer's delay plus the clocks' difference: the smallest of
    the recent ones is used, so one slow answer (a busy event loop) does not make slots late,
    and an answer never makes them early."""
    s = ratelimit.Schedule()
    # the database's clock reads 1000.0 when this process's reads 5.0 (difference -995)
    fast = s.slots(0.2, 0.01, 1000.0, received=5.002)  # answered 2 ms later
    assert fast is not None
    assert fast.since == pytest.approx(5.002) and fast.first == pytest.approx(5.202)
    slow = s.slots(0.2, 0.01, 1001.0, received=6.080)  # 80 ms later: the 2 ms one is kept
    assert slow is not None and slow.since == pytest.approx(6.002)
    assert slow.first == pytest.approx(6.202) and slow.spacing == 0.01
    # a reading past two clock windows is forgotten: a clock step is followed
    then = 105.0 + 2 * ratelimit.CLOCK_WINDOW + 1
    later = s.slots(0.0, 0.01, 1100.0, received=then)
    assert later is not None and later.since == pytest.approx(then)


def test_no_slot_when_the_take_booked_none() -> None:
    assert ratelimit.Schedule().slots(None, None, None, received=1.0) is None


def test_the_lead_follows_the_99th_percentile_of_recent_grant_to_wire_times(
        monkeypatch: Any) -> None:
    clock = [100.0]
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: clock[0])
    s = ratelimit.Schedule()
    assert s.lead() == ratelimit.LEAD_FIRST  # nothing measured yet
    slot = ratelimit.Slots(first=100.05, spacing=0.01, since=100.0)
    s.arrived(slot.at(0), 100.030)  # 30 ms from the grant to the wire: on time
    s.arrived(slot.at(1), 100.020)  # its slot's `since` is 100.01: 10 ms
    assert s.late == 0
    assert s.lead() == pytest.approx(0.030 * ratelimit.LEAD_MARGIN)
    s.arrived(slot.at(2), 100.200)  # 180 ms: late for its slot (100.07) by 130 ms
    assert s.late == 1 and s.latest == pytest.approx(0.13)
    # computed again only every LEAD_EVERY
    assert s.lead() == pytest.approx(0.030 * ratelimit.LEAD_MARGIN)
    # a hundred fast calls: the one slow call is beyond the 99th percentile
    for _ in range(200):
        s.arrived(ratelimit.Slot(at=200.0, since=199.99), 200.0)  # 10 ms
    clock[0] += ratelimit.LEAD_EVERY
    assert s.lead() == pytest.approx(0.010 * ratelimit.LEAD_MARGIN)
    for _ in range(ratelimit.LEAD_SAMPLES):  # all slow: held to LEAD_MAX
        s.arrived(ratelimit.Slot(at=300.0, since=299.0), 300.0)
    clock[0] += ratelimit.LEAD_EVERY
    assert s.lead() == ratelimit.LEAD_MAX
    for _ in range(ratelimit.LEAD_SAMPLES):  # all at once: never below LEAD_MIN
        s.arrived(ratelimit.Slot(at=400.0, since=400.0), 400.0)
    clock[0] += ratelimit.LEAD_EVERY
    assert s.lead() == ratelimit.LEAD_MIN
    assert s.most_lead == ratelimit.LEAD_MAX


def test_the_pacer_holds_a_call_until_its_slot_and_keeps_no_time_of_its_own(
        monkeypatch: Any) -> None:
    clock = [50.0]
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: clock[0])
    pacer = ratelimit.Pacer(lambda: 100.0)
    with ratelimit.on_this_thread(ratelimit.Slot(at=50.3, since=50.0)):
        assert pacer.delay() == pytest.approx(0.3)
        assert pacer.delay() == pytest.approx(0.3)  # passed again (sesconn): same slot
    assert list(pacer.schedule._need) == [0.0]  # measured once (0 s from its grant)
    with ratelimit.on_this_thread(ratelimit.Slot(at=49.0, since=48.9)):
        assert pacer.delay() == 0.0  # late: at once
    assert pacer.schedule.late == 1
    # a call without a slot is spaced by this process's own schedule, which the slotted
    # calls did not touch
    assert pacer.delay() == 0.0
    assert pacer.delay() == pytest.approx(0.01)


def test_no_limit_no_wait_even_with_a_slot() -> None:
    pacer = ratelimit.Pacer(lambda: 0.0)
    with ratelimit.on_this_thread(ratelimit.Slot(at=math.inf, since=0.0)):
        assert pacer.delay() == 0.0


def test_a_group_s_calls_leave_at_their_slots() -> None:
    """The sender gives the i-th row of a group the i-th slot: the calls start one spacing
    apart from the first slot, whatever the threads."""
    started: list[float] = []

    class Stamping(Slow):
        def send(self, message: render.Message) -> str:
            started.append(time.monotonic())
            return super().send(message)

    pacer = ratelimit.Pacer(lambda: 20.0)
    executor = concurrent.futures.ThreadPoolExecutor(8)
    try:
        sender = dispatch.Sender(Stamping(0.0), dispatch.Retries(), executor, pacer)
        rows = [dispatch.Recipient(i, f"u{i}@example.com", None) for i in range(6)]
        first = time.monotonic() + 2.0  # well after the render, even on a busy machine
        slots = ratelimit.Slots(first=first, spacing=0.05, since=first - 2.0)
        out = asyncio.run(sender.send_group(CONTENT, rows, {}, time.monotonic(), slots=slots))
    finally:
        executor.shutdown()
    assert [o.outcome for o in out] == ["sent"] * 6
    started.sort()
    assert all(at >= first + i * 0.05 for i, at in enumerate(started)), (first, started)
    gaps = [b - a for a, b in zip(started, started[1:], strict=False)]
    assert min(gaps) >= 0.05 - 0.005, gaps


def test_a_call_too_late_for_its_slot_is_put_back_not_made() -> None:
    """A call later than its slot's late_max is not made but put back (no attempt counted).
    (The engine's slots have no limit since LATE_SHARE is off: see worker.ratelimit.)"""
    provider = Slow(0.0)
    pacer = ratelimit.Pacer(lambda: 100.0)
    executor = concurrent.futures.ThreadPoolExecutor(2)
    try:
        sender = dispatch.Sender(provider, dispatch.Retries(), executor, pacer)
        rows = [dispatch.Recipient(i, f"u{i}@example.com", None) for i in range(3)]
        # slots a second ago, 20 ms of lateness allowed (burst 5 at 100/s: 40 ms of slack)
        now = time.monotonic()
        s = ratelimit.Slots(first=now - 1.0, spacing=0.01, since=now - 1.0, late_max=0.02)
        out = asyncio.run(sender.send_group(CONTENT, rows, {}, time.monotonic(), slots=s))
    finally:
        executor.shutdown()
    assert [o.outcome for o in out] == ["release"] * 3
    assert provider.calls == 0 and sender.too_late == 3
    assert "too late for its slot" in (out[0].error or "")


def test_no_call_of_the_engine_s_slots_is_too_late() -> None:
    """LATE_SHARE is off: late calls go at once (putting them back livelocked a process slower
    than the rate)."""
    for slack in (None, 0.04):
        s = ratelimit.Schedule().slots(0.0, 0.01, 1000.0, received=5.0, slack=slack)
        assert s is not None and not s.at(0).too_late(1e9)


def test_a_call_too_late_at_the_connection_gate_is_not_called_either() -> None:
    """The pacer also runs after a wait at the gate that opens connections (sesconn), inside
    urllib3, where botocore wraps what it raises: still `NotCalled`, never a transient error
    (which would count an attempt and feed the error-rate breaker)."""
    import botocore.exceptions

    from pgcast.worker import errors, ses

    wrapped = botocore.exceptions.HTTPClientError(error=errors.NotCalled(ratelimit.TOO_LATE))
    assert isinstance(ses.classify(wrapped, 0), errors.NotCalled)
    assert isinstance(ses.classify(errors.NotCalled("x"), 0), errors.NotCalled)
    other = botocore.exceptions.HTTPClientError(error=ConnectionResetError())
    assert isinstance(ses.classify(other, 0), errors.Transient)
