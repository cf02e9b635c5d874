"""api.wake.Waker: one NOTIFY for many sign-ups, and always one that starts after each request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from pgcast.api import db, wake


class FakeDb:
    """Stands in for db.one: records when each wake-up started, takes `took` seconds."""

    def __init__(self, took: float, fail: bool = False) -> None:
        self.took = took
        self.fail = fail
        self.starts: list[float] = []

    async def one(self, pool: Any, name: str, params: dict[str, Any]) -> None:
        assert name == "wake_messages" and params == {}
        self.starts.append(time.monotonic())
        await asyncio.sleep(self.took)
        if self.fail:
            raise psycopg.OperationalError("gone")


def test_requests_while_one_runs_share_the_next_which_starts_after_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDb(took=0.2)
    monkeypatch.setattr(db, "one", fake.one)

    async def run() -> list[float]:
        w = wake.Waker(pool=None, spacing=0.0)  # type: ignore[arg-type]
        w.request()
        await asyncio.sleep(0.01)  # the first is under way
        asked = []
        for _ in range(50):
            w.request()
            asked.append(time.monotonic())
            await asyncio.sleep(0)
        await w.close()
        assert w.sent == 2
        return asked

    asked = asyncio.run(run())
    assert len(fake.starts) == 2  # 51 requests, two NOTIFYs
    assert fake.starts[1] >= asked[-1]  # the last request is served by one started after it


def test_wake_ups_are_spaced_and_a_failure_is_survived(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeDb(took=0.0, fail=True)
    monkeypatch.setattr(db, "one", fake.one)

    async def run() -> int:
        w = wake.Waker(pool=None, spacing=0.1)  # type: ignore[arg-type]
        for _ in range(3):
            w.request()
            await w.close()
        return w.sent

    assert asyncio.run(run()) == 0  # every one failed, none raised
    assert [r.getMessage() for r in caplog.records].count(
        "could not wake the message loops (gone); their poll will") == 3
    assert len(fake.starts) == 3
    gaps = [b - a for a, b in zip(fake.starts, fake.starts[1:], strict=False)]
    assert min(gaps) >= 0.09
    assert wake.SPACING == 0.02  # docs/subscribers.md: at most one every 20 ms
