"""The handoff group size: fixed, or sized to the provider's measured speed; its CLI flags."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from pgcast.bin import cli
from pgcast.worker import dispatch, engine, inflight, render
from pgcast.worker import errors as perr


def feed(sizer: inflight.GroupSizer, per_message: float, groups: int = 30) -> int:
    """Observe `groups` groups of the current size at `per_message` seconds each; the size."""
    for _ in range(groups):
        n = sizer.size()
        sizer.observe(per_message * n, n)
    return sizer.size()


def test_auto_starts_at_ten() -> None:
    assert inflight.GroupSizer(None, 250, 500).size() == 10
    assert inflight.GroupSizer(None, 250, 4).size() == 4  # never above the batch


def test_auto_grows_to_the_batch_for_a_fast_provider() -> None:
    assert feed(inflight.GroupSizer(None, 250, 500), 0.0) == 500
    assert feed(inflight.GroupSizer(None, 250, 500), 2e-6) == 500
    assert feed(inflight.GroupSizer(None, 250, 200), 1e-4) == 200


def test_auto_shrinks_for_a_slow_provider() -> None:
    sizer = inflight.GroupSizer(None, 250, 500)
    sizer.observe(1.0, 10)  # the first group: 100 ms a message
    assert sizer.size() == 2
    assert feed(sizer, 0.1) == 2
    assert feed(inflight.GroupSizer(None, 250, 500), 0.08) == 3
    assert feed(inflight.GroupSizer(None, 1000, 500), 0.1) == 10


def test_auto_never_below_one() -> None:
    sizer = inflight.GroupSizer(None, 250, 500)
    assert feed(sizer, 5.0) == 1
    sizer.observe(3600.0, 1)
    assert sizer.size() == 1


def test_auto_follows_a_change_in_speed_gradually() -> None:
    sizer = inflight.GroupSizer(None, 250, 500)
    assert feed(sizer, 0.001) == 250
    sizer.observe(0.1, 1)  # one slow message: the average moves, it does not jump there
    assert 1 < sizer.size() < 250
    assert feed(sizer, 0.1, groups=60) == 2
    assert feed(sizer, 0.0, groups=60) == 500


def test_a_fixed_size_ignores_measurements() -> None:
    sizer = inflight.GroupSizer(50, 250, 500)
    assert sizer.size() == 50
    for per_message in (0.0, 0.1, 10.0):
        sizer.observe(per_message * 50, 50)
        assert sizer.size() == 50
    assert sizer.per_message is None
    # exactly as before: a fixed size is not clamped to the batch (the batch caps it anyway)
    assert inflight.GroupSizer(800, 250, 500).size() == 800


def test_empty_or_odd_observations_are_ignored() -> None:
    sizer = inflight.GroupSizer(None, 250, 500)
    sizer.observe(1.0, 0)
    sizer.observe(float("nan"), 5)
    sizer.observe(float("inf"), 5)
    assert sizer.per_message is None and sizer.size() == 10
    sizer.observe(-1.0, 5)  # a clock step backwards counts as instant
    assert sizer.size() == 500
    sizer.per_message = 5e-324  # decayed to a subnormal: 0.25 / it overflows to inf
    assert sizer.size() == 500


@pytest.mark.parametrize(("fixed", "group_ms", "batch"),
                         [(0, 250, 500), (None, 0, 500), (None, float("nan"), 500),
                          (None, 250, 0)])
def test_bad_settings_are_refused(fixed: int | None, group_ms: float, batch: int) -> None:
    with pytest.raises(ValueError):
        inflight.GroupSizer(fixed, group_ms, batch)


# -- the engine feeds it ------------------------------------------------------------------


class RecordingSizer(inflight.GroupSizer):
    def __init__(self) -> None:
        super().__init__(None, 250, 500)
        self.seen: list[tuple[float, int]] = []

    def observe(self, seconds: float, messages: int) -> None:
        self.seen.append((seconds, messages))
        super().observe(seconds, messages)


class SlowProvider:
    """Sleeps `delay` per send, raises the scripted exceptions (unit ring only)."""

    name = "slow"
    blocking = False

    def __init__(self, delay: float, script: list[Any]) -> None:
        self.delay = delay
        self.script = list(script)

    def send(self, message: render.Message) -> str:
        time.sleep(self.delay)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return str(step)

    def max_send_rate(self) -> float | None:
        return None


def messages(n: int) -> list[render.Message]:
    content = render.Content(str(uuid.uuid4()), "a", "S", "f@example.com", "t", None)
    return [render.render(content, i, f"u{i}@example.com", None) for i in range(n)]


def test_send_group_measures_the_messages_it_attempted() -> None:
    script: list[Any] = ["m0", perr.Transient("503"), perr.Throttled("slow down"), "m3", "m4"]
    eng = engine.Engine(engine.Settings(), SlowProvider(0.01, script),
                        pool=None)  # type: ignore[arg-type]
    sizer = eng.sizer = RecordingSizer()
    content = render.Content(str(uuid.uuid4()), "a", "S", "f@example.com", "t", None)
    handed = [dispatch.Recipient(i, f"u{i}@example.com", None) for i in range(5)]
    outcomes = asyncio.run(eng.sender.send_group(content, handed, {}))
    eng._observe(outcomes)
    assert [o.outcome for o in outcomes] == ["sent", "retry", "throttled", "throttled",
                                             "throttled"]
    assert len(sizer.seen) == 1
    seconds, attempted = sizer.seen[0]
    assert attempted == 3  # the two after the throttle never reached the provider
    assert seconds >= 0.03
    assert sizer.size() <= 250 // 10


def test_engine_sizer_follows_settings() -> None:
    fixed = engine.Engine(engine.Settings(group_size=10), SlowProvider(0, []),
                          pool=None)  # type: ignore[arg-type]
    assert fixed.sizer.size() == 10
    auto = engine.Engine(engine.Settings(batch_size=300, group_ms=100), SlowProvider(0, []),
                         pool=None)  # type: ignore[arg-type]
    assert (auto.sizer.fixed, auto.sizer.target, auto.sizer.batch_size) == (None, 0.1, 300)


# -- the flags ----------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "size", "ms"), [
    ([], None, 250.0),
    (["--group-size", "auto"], None, 250.0),
    (["--group-size", "AUTO", "--group-ms", "80"], None, 80.0),
    (["--group-size", "10"], 10, 250.0),
    (["--group-size", "1", "--group-ms", "0.5"], 1, 0.5),
])
def test_group_flags_parse(monkeypatch: pytest.MonkeyPatch, argv: list[str], size: int | None,
                           ms: float) -> None:
    monkeypatch.delenv("PGCAST_GROUP_MS", raising=False)
    args = cli.build_parser().parse_args(["worker", *argv])
    assert (args.group_size, args.group_ms) == (size, ms)


def test_group_ms_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCAST_GROUP_MS", "40")
    assert cli.build_parser().parse_args(["worker"]).group_ms == 40.0
    assert cli.build_parser().parse_args(["worker", "--group-ms", "90"]).group_ms == 90.0


@pytest.mark.parametrize(("argv", "env", "said"), [
    (["--group-size", "0"], None, "--group-size: must be 'auto' or a whole number >= 1"),
    (["--group-size", "-2"], None, "--group-size: must be 'auto' or a whole number >= 1"),
    (["--group-size", "1.5"], None, "--group-size: must be 'auto' or a whole number >= 1"),
    (["--group-size", "big"], None, "--group-size: must be 'auto' or a whole number >= 1"),
    (["--group-ms", "0"], None, "--group-ms: must be a finite number > 0"),
    (["--group-ms", "-5"], None, "--group-ms: must be a finite number > 0"),
    (["--group-ms", "inf"], None, "--group-ms: must be a finite number > 0"),
    (["--group-ms", "soon"], None, "--group-ms: must be a finite number > 0"),
    ([], "nan", "PGCAST_GROUP_MS"),
    ([], "fast", "PGCAST_GROUP_MS"),
])
def test_bad_group_flags_are_one_line_usage_errors(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str],
        env: str | None, said: str) -> None:
    if env is None:
        monkeypatch.delenv("PGCAST_GROUP_MS", raising=False)
    else:
        monkeypatch.setenv("PGCAST_GROUP_MS", env)
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["worker", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and said in err


def test_a_bad_group_ms_environment_does_not_break_other_commands(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCAST_GROUP_MS", "fast")
    assert cli.build_parser().parse_args(["db", "url"]).action == "url"
