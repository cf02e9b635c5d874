"""No clock assumptions: a machine booted a moment ago, where time.monotonic() is tiny."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from pgcast.worker import claims, ratelimit
from tests.unit import test_picker


@pytest.mark.parametrize("boot", [0.0, 0.001, 1.0])
def test_the_pacer_lets_the_first_call_go_at_once_just_after_boot(monkeypatch: Any,
                                                                  boot: float) -> None:
    clock = [boot]
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: clock[0])
    pacer = ratelimit.Pacer(lambda: 10.0)
    assert pacer.delay() == 0.0
    assert pacer.delay() == pytest.approx(0.1)  # the next one a tenth of a second later
    clock[0] += 1.0
    assert pacer.delay() == 0.0


def test_a_broadcast_never_backed_off_is_picked_just_after_boot(monkeypatch: Any) -> None:
    monkeypatch.setattr(test_picker.picker.time, "monotonic", lambda: 0.0)
    assert claims.Active(1, None).not_before < 0.0
    a = uuid.uuid4()
    assert test_picker.picks([(a, 1, None, 1.0)], 100, 2)[a] == 2
