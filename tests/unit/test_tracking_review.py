"""Review of opens and clicks (issue 29) without a database: the recorder's memory of
repeated events stays bounded."""

from __future__ import annotations

import asyncio
import time

import pytest

from pgcast.api import tracking_events
from tests.unit.test_tracking import event


def test_a_token_s_repeats_are_counted_to_a_bound_and_remembered_in_bounded_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking_events, "MAX_REPEAT_KEYS", 3)

    async def run() -> tuple[int, int, int]:
        rec = tracking_events.Recorder(None)  # type: ignore[arg-type]
        now = time.monotonic()
        for _ in range(tracking_events.REPEATS + 5):  # one message's link, again and again
            rec.add(event(0, 1, now))
        kept = len(rec.pending)
        for i in range(10):  # other messages: the oldest keys are forgotten
            rec.add(event(0, 100 + i, now))
        # a new window: the first message's link counts again
        rec.add(event(0, 1, now + tracking_events.REPEAT_WINDOW))
        assert rec._task is not None
        rec._task.cancel()
        return kept, rec.repeated, len(rec.repeats)

    assert asyncio.run(run()) == (tracking_events.REPEATS, 5, 3)


def test_a_token_s_count_is_forgotten_a_window_after_it_began() -> None:
    rec = tracking_events.Recorder(None)  # type: ignore[arg-type]
    long_ago = time.monotonic() - tracking_events.REPEAT_WINDOW - 1
    for message in (1, 2):
        assert not rec.flooding(event(0, message, long_ago))
    assert not rec.flooding(event(0, 3, time.monotonic()))
    rec.take()
    assert list(rec.repeats) == [(event(0, 3, 0).broadcast_id, 3, "click", 0)]


def test_a_token_is_read_only_as_pgcast_wrote_it() -> None:
    # the same bytes in standard base64 (`+`, `/`: `/c/ab/cd` is a token too), or padded,
    # were read as the token: one token, many URLs
    from pgcast.mail import tracking
    from tests.unit.test_tracking import KEYS, content, tokens

    def with_url_safe_chars(cid: int) -> str | None:
        """A token of this contact's message holding `-` or `_` (a token is random-looking:
        about one in four holds neither, so one message may have none)."""
        msg = content("contact").render(cid, "ann@example.com", "Ann", {"code": "c1"})
        assert msg.html is not None
        return next((t for t in tokens(msg.html, "c") if "-" in t or "_" in t), None)

    good = next(t for t in map(with_url_safe_chars, range(42, 242)) if t is not None)
    assert tracking.read(KEYS, good).link is not None
    for variant in (good.replace("-", "+").replace("_", "/"), good + "=", good + "==",
                    good + "\n"):
        with pytest.raises(tracking.InvalidToken):
            tracking.read(KEYS, variant)
