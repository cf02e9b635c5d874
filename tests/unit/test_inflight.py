"""The in-flight window, claim sizes, and per-recipient isolation of rendering and sending."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
import uuid
from typing import Any

import pytest

from pgcast.bin import cli
from pgcast.worker import claims, dispatch, engine, inflight, ratelimit, render


def test_the_window_follows_littles_law_within_its_bounds() -> None:
    w = inflight.Window(128)
    assert w.limit(200) == 128  # no latency measured yet: the most
    for _ in range(100):
        w.observe(0.1)
    assert w.latency == pytest.approx(0.1)
    assert w.limit(200) == math.ceil(200 * 0.1 * inflight.HEADROOM) + inflight.SPARE
    assert w.limit(0) == 128  # unlimited rate: the most
    for _ in range(100):
        w.observe(0.3)
    assert w.limit(200) == math.ceil(200 * 0.3 * inflight.HEADROOM) + inflight.SPARE
    assert w.limit(2000) == 128  # never above --max-in-flight, however slow the provider


def test_a_throttle_halves_the_window_and_successes_grow_it_back() -> None:
    w = inflight.Window(64)
    w.throttled()
    assert w.limit(0) == 32
    w.throttled()
    w.throttled()
    assert w.limit(0) == 8
    for _ in range(10):
        w.throttled()
    assert w.limit(0) == 1  # never below one call
    w.succeeded(1000)
    assert 40 <= w.limit(0) <= 46  # about sqrt(2 x 1000): additive increase
    w.succeeded(100_000)
    assert w.limit(0) == 64


def test_acquire_grants_what_is_free_and_waits_for_a_release() -> None:
    async def run() -> tuple[int, int, int]:
        w = inflight.Window(5)
        first = await w.acquire(3, 0)
        second = await w.acquire(4, 0)  # only two left
        waiter = asyncio.create_task(w.acquire(2, 0))
        await asyncio.sleep(0)
        assert not waiter.done()
        w.release(1)
        third = await asyncio.wait_for(waiter, 5)
        return first, second, third
    assert asyncio.run(run()) == (3, 2, 1)


@pytest.mark.parametrize(("rate", "loops", "lease", "batch", "want"), [
    (200.0, 4, 30.0, 500, 50),  # a second of 200/s over four loops
    (math.inf, 4, 30.0, 500, 500),  # nothing known: the batch size
    (17_000.0, 4, 30.0, 500, 500),
    (200.0, 1, 1.5, 500, 100),  # at most a third of a lease
    (0.5, 4, 30.0, 500, 1),
])
def test_claims_hold_about_a_second_of_sending(rate: float, loops: int, lease: float,
                                                batch: int, want: int) -> None:
    assert claims.claim_size(rate, loops, lease, batch) == want


def test_the_cli_default_in_flight_is_the_engines() -> None:
    assert int(cli.MAX_IN_FLIGHT) == engine.MAX_IN_FLIGHT >= 64
    args = cli.build_parser().parse_args(["worker"])
    assert args.max_in_flight == engine.MAX_IN_FLIGHT
    assert cli.build_parser().parse_args(["worker", "--max-in-flight", "7"]).max_in_flight == 7


class Raising:
    """A provider whose send raises what it is given (unit ring only)."""

    name = "raising"
    blocking = False

    def __init__(self, exc: Exception, may_have_sent: bool) -> None:
        self.exc = exc
        self.may_have_sent_on_error = may_have_sent

    def send(self, message: render.Message) -> str:
        raise self.exc

    def max_send_rate(self) -> float | None:
        return None


CONTENT = render.Content(str(uuid.uuid4()), "a", "S", "f@example.com", "t", None)


@pytest.mark.parametrize(("may_have_sent", "want"), [(True, "unknown"), (False, "failed")])
def test_an_unclassified_provider_exception_is_that_recipients_outcome(
        may_have_sent: bool, want: str) -> None:
    sender = dispatch.Sender(Raising(KeyError("MessageId"), may_have_sent), dispatch.Retries(),
                             None)
    one = [dispatch.Recipient(1, "a@example.com", None)]
    out = asyncio.run(sender.send_group(CONTENT, one, {}))
    assert [(o.outcome, o.seconds is not None) for o in out] == [(want, True)]
    assert out[0].error is not None and "KeyError" in out[0].error


def test_a_message_that_cannot_be_built_fails_alone_and_is_never_sent() -> None:
    sent: list[str] = []

    class Recording(Raising):
        def send(self, message: render.Message) -> str:
            sent.append(message.to)
            return "m"

    sender = dispatch.Sender(Recording(RuntimeError(), True), dispatch.Retries(), None)
    handed = [dispatch.Recipient(i, f"u{i}@example.com", None, {"n": 2 - i}) for i in (1, 2, 3)]
    # rendered in the render pool: the second recipient's data divides by zero
    divides = render.Content(str(uuid.uuid4()), "a", "S", "f@example.com",
                             "{{ 1 // contact.attributes.n }}", None)
    out = asyncio.run(sender.send_group(divides, handed, {}))
    assert [o.outcome for o in out] == ["sent", "failed", "sent"]
    assert out[1].seconds is None and out[1].error is not None
    assert out[1].error.startswith("cannot build the message: text: ZeroDivisionError")
    assert sent == ["u1@example.com", "u3@example.com"]
    # content that cannot be built at all: every recipient fails with the reason
    out = asyncio.run(sender.send_group("KeyError: 'subject'", handed, {}))
    assert {o.outcome for o in out} == {"failed"} and len(sent) == 2


def test_the_pacer_spaces_calls_at_the_rate() -> None:
    """Calls that come together leave one every 1 / rate: the first at once."""
    pacer = ratelimit.Pacer(lambda: 100.0)
    delays = [pacer.delay() for _ in range(12)]
    assert delays[0] == 0.0
    for i, d in enumerate(delays):
        assert d == pytest.approx(i / 100, abs=0.005)


def test_the_pacer_gives_no_credit_for_a_quiet_spell() -> None:
    """After a pause, calls are not let through in a burst to catch up."""
    pacer = ratelimit.Pacer(lambda: 100.0)
    pacer.delay()
    time.sleep(0.05)  # the time that passes is what is tested, not a synchronisation
    assert [round(pacer.delay(), 2) for _ in range(3)] == [0.0, 0.01, 0.02]


def test_the_pacer_does_nothing_without_a_limit() -> None:
    pacer = ratelimit.Pacer(lambda: 0.0)
    assert [pacer.delay() for _ in range(1000)] == [0.0] * 1000


class Slow(Raising):
    """A blocking provider that answers after `seconds` (unit ring only)."""

    blocking = True

    def __init__(self, seconds: float) -> None:
        super().__init__(RuntimeError(), True)
        self.seconds = seconds
        self.calls = 0

    def send(self, message: render.Message) -> str:
        self.calls += 1
        time.sleep(self.seconds)
        return f"m{message.contact_id}"


def test_a_call_that_would_start_after_the_deadline_is_not_made_but_put_back() -> None:
    """--group-ms bounds the crash window in time: a row whose call would start later than
    that after its handoff is released (pending again, no attempt), never sent."""
    provider = Slow(0.0)
    executor = concurrent.futures.ThreadPoolExecutor(4)
    try:
        sender = dispatch.Sender(provider, dispatch.Retries(), executor, None, deadline=0.05)
        handed = [dispatch.Recipient(i, f"u{i}@example.com", None) for i in (1, 2)]
        on_time = asyncio.run(sender.send_group(CONTENT, handed, {}, time.monotonic()))
        late = asyncio.run(sender.send_group(CONTENT, handed, {}, time.monotonic() - 0.1))
    finally:
        executor.shutdown()
    assert [o.outcome for o in on_time] == ["sent", "sent"]
    assert [o.outcome for o in late] == ["release", "release"]
    assert late[0].seconds is None and late[0].error is not None
    assert provider.calls == 2  # the late ones were never called


def test_claims_ramp_up_when_nothing_sizes_them() -> None:
    """No limit and a provider that answers at once: a batch over the loops, doubling."""
    entry = claims.Active(1, None)
    sizes = [claims.ramped(entry, 500, 4, 500) for _ in range(5)]
    assert sizes == [125, 250, 500, 500, 500]
    assert claims.ramped(claims.Active(1, None), 60, 4, 500) == 60  # never above the size


def test_a_call_past_its_deadline_books_no_pacer_time() -> None:
    """The deadline is checked before the pacer: a row put back leaves the pacer's schedule
    as it was, so the calls that are made are not spaced behind calls never made."""
    pacer = ratelimit.Pacer(lambda: 10.0)
    executor = concurrent.futures.ThreadPoolExecutor(2)
    try:
        sender = dispatch.Sender(Slow(0.0), dispatch.Retries(), executor, pacer, deadline=0.05)
        late = [dispatch.Recipient(i, f"u{i}@example.com", None) for i in range(5)]
        out = asyncio.run(sender.send_group(CONTENT, late, {}, time.monotonic() - 1.0))
    finally:
        executor.shutdown()
    assert {o.outcome for o in out} == {"release"}
    assert pacer.delay() == 0.0  # nothing was booked: the next call goes at once


def test_a_render_longer_than_the_deadline_does_not_release_the_group() -> None:
    """The deadline counts from the end of the render too: a group whose render took longer
    than --group-ms was released whole, claimed again and released again, for ever."""

    class SlowBuilder(dispatch.Builder):
        """Renders as the real one, after `seconds` (unit ring only)."""

        async def build(self, content: Any, handed: list[dispatch.Recipient]) -> Any:
            await asyncio.sleep(0.1)
            return await super().build(content, handed)

    provider = Slow(0.0)
    executor = concurrent.futures.ThreadPoolExecutor(4)
    try:
        sender = dispatch.Sender(provider, dispatch.Retries(), executor, None, deadline=0.05)
        sender.builder = SlowBuilder()
        handed = [dispatch.Recipient(i, f"u{i}@example.com", None) for i in (1, 2)]
        got = asyncio.run(sender.send_group(CONTENT, handed, {}, time.monotonic()))
    finally:
        executor.shutdown()
    assert [o.outcome for o in got] == ["sent", "sent"]
