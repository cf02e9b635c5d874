"""The sign-up pages' per-client limit (PGCAST_FORM_RATE), as docs/subscribers.md states it:
fixed one-minute windows kept in the process's memory, shared by every client."""

from __future__ import annotations

import pytest

from pgcast.api import subscriber_pages as sp


def test_a_window_starts_at_the_first_post_after_the_last_one_ended() -> None:
    limit = sp.ClientLimit(2)
    assert [limit.allow("a", t) for t in (100.0, 130.0, 159.9)] == [True, True, False]
    # the window began at 100 s; the next begins at the first POST 60 s or more after it
    assert [limit.allow("a", t) for t in (160.0, 161.0, 162.0)] == [True, True, False]


def test_a_client_gets_twice_the_rate_across_a_window_boundary() -> None:
    limit = sp.ClientLimit(10)
    limit.allow("someone else", 0.0)  # opens the window at 0 s
    first = [limit.allow("a", 59.9) for _ in range(11)]
    second = [limit.allow("a", 60.0) for _ in range(11)]
    assert first.count(True) == second.count(True) == 10  # 20 within 0.1 s


def test_one_window_for_every_client() -> None:
    limit = sp.ClientLimit(1)
    assert limit.allow("a", 0.0) and not limit.allow("a", 30.0)
    assert limit.allow("b", 59.0)  # b's first POST does not open a window of its own
    # the window opened by a's first POST ends at 60 s for b too: b posts again 2 s later
    assert limit.allow("a", 60.0) and limit.allow("b", 61.0)
    assert not limit.allow("b", 62.0)


def test_past_max_clients_the_window_starts_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sp, "MAX_CLIENTS", 3)
    limit = sp.ClientLimit(1)
    assert limit.allow("a", 0.0) and not limit.allow("a", 1.0)
    assert limit.allow("b", 2.0) and limit.allow("c", 3.0)  # 3 clients remembered
    # the next POST, even of a client already over the limit: every count back to zero
    assert limit.allow("a", 4.0) and not limit.allow("a", 5.0)
