"""Which broadcast a loop works on next: stride scheduling by fair share (unit ring: a fake
database answers the two statements the picker runs)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

from pgcast.worker import picker


class Db:
    """Answers `active_broadcasts` and `rate_get` from lists (unit ring only)."""

    def __init__(self, rows: list[tuple[uuid.UUID, int, float | None, float]],
                 rate: float) -> None:
        self.rows = rows
        self.rate = rate

    async def q(self, name: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        if name == "active_broadcasts":
            return list(self.rows)
        assert name == "rate_get"
        return [("global", self.rate, 5.0)]


def picks(rows: list[tuple[uuid.UUID, int, float | None, float]], rate: float, n: int,
          claim: int = 25) -> Counter[uuid.UUID]:
    """n picks, each claiming `claim` rows; how many went to each broadcast."""
    async def run() -> Counter[uuid.UUID]:
        p = picker.Picker(Db(rows, rate), {}, 0, 3600.0, lambda bid: None)  # type: ignore[arg-type]
        got: Counter[uuid.UUID] = Counter()
        for _ in range(n):
            bid = await p.pick(False)
            assert bid is not None
            got[bid] += 1
            p.claimed(bid, claim)
        return got
    return asyncio.run(run())


def test_claims_follow_the_shares_not_round_robin() -> None:
    high, low1, low2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    got = picks([(low1, 1, None, 0.2), (low2, 1, None, 0.2), (high, 1, None, 0.6)], 100, 500)
    assert got[high] == 300 and got[low1] == 100 and got[low2] == 100


def test_equal_shares_take_turns() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    got = picks([(a, 1, None, 0.5), (b, 1, None, 0.5)], 100, 10)
    assert got == Counter({a: 5, b: 5})


def test_a_broadcast_capped_below_its_share_is_picked_for_its_cap() -> None:
    """A share of half of 100/s, but a cap of 10/s: it gets claims for 10/s, the other the rest."""
    capped, free = uuid.uuid4(), uuid.uuid4()
    got = picks([(capped, 1, 10.0, 0.5), (free, 1, None, 0.5)], 100, 600)
    assert got[capped] == 100 and got[free] == 500


def test_a_broadcast_that_came_back_empty_is_skipped_until_the_next_look() -> None:
    async def run() -> list[uuid.UUID | None]:
        a, b = uuid.uuid4(), uuid.uuid4()
        p = picker.Picker(Db([(a, 1, None, 0.5), (b, 1, None, 0.5)], 100), {}, 0, 3600.0,
                          lambda bid: None)  # type: ignore[arg-type]
        first = await p.pick(False)
        assert first is not None
        p.active[first].empty = True
        out = [await p.pick(False) for _ in range(3)]
        p.active[out[0]].empty = True  # type: ignore[index]
        out.append(await p.pick(False))
        p.look_again()
        out.append(await p.pick(False))
        return [first, *out]
    first, *rest = asyncio.run(run())
    assert rest[0] == rest[1] == rest[2] != first
    assert rest[3] is None and rest[4] is not None


def test_a_broadcast_that_starts_late_gets_no_credit_from_one_long_drained() -> None:
    """X drained early; Y has had many claims; Z starts: Z begins at the stride clock (where
    the picks are now), not at X's old count, so Y is not starved while Z catches up."""
    async def run() -> Counter[uuid.UUID]:
        x, y, z = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        db = Db([(x, 1, None, 0.5), (y, 1, None, 0.5)], 100)
        p = picker.Picker(db, {}, 0, 3600.0, lambda bid: None)  # type: ignore[arg-type]
        for _ in range(2):  # x and y once each, then x has nothing left
            bid = await p.pick(False)
            assert bid is not None
            p.claimed(bid, 25)
        p.active[x].empty = True
        for _ in range(100):
            bid = await p.pick(False)
            assert bid == y
            p.claimed(bid, 25)
        db.rows = [(y, 1, None, 0.5), (z, 1, None, 0.5)]  # x finished; z was just sent
        await p.refresh()
        got: Counter[uuid.UUID] = Counter()
        for _ in range(20):
            bid = await p.pick(False)
            assert bid is not None
            got[bid] += 1
            p.claimed(bid, 25)
        return got
    got = asyncio.run(run())
    assert 9 <= got[next(iter(got))] <= 11 and len(got) == 2  # y and z take turns


def test_a_machine_booted_a_second_ago_still_reads_the_broadcasts(
        monkeypatch: Any) -> None:
    """monotonic() counts from boot: on a fresh machine it is small, and "never refreshed"
    must still be long ago (a 0.0 start made the first pick see no broadcast)."""
    monkeypatch.setattr(picker.time, "monotonic", lambda: 1.0)
    a = uuid.uuid4()
    got = picks([(a, 1, None, 1.0)], 100, 3)
    assert got == Counter({a: 3})
