"""mail.renderpool: renders in processes with hard limits, a share per account."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from pgcast.mail import errors, message, renderpool
from pgcast.worker import dispatch
from tests.unit.test_render_budget import MACRO

ITEM = (1, "a@example.com", "A", None, None, None)


@pytest.fixture
def pool() -> Iterator[renderpool.RenderPool]:
    p = renderpool.RenderPool(processes=2, timeout_ms=1000)
    yield p
    p.close()


def spec(text: str, account: str = "a") -> renderpool.Spec:
    return renderpool.spec(message.Content(str(uuid.uuid4()), account, "S", "f@example.com",
                                           text, None))


def test_memory_past_the_sandbox_bounds_stops_at_the_process_limit(
        pool: renderpool.RenderPool) -> None:
    # each value is within the sandbox's bounds; together they pass the address-space limit
    hog = "".join(f"{{% set ns.a{i} = 'x' * 1000000 ~ {i} %}}" for i in range(400))
    text = "{% set ns = namespace() %}" + hog + "ok"
    (result,) = asyncio.run(pool.run("a", "messages", spec(text), [ITEM]))
    assert isinstance(result, renderpool.Failure)
    assert result.budget == "memory", result
    # the pool goes on: the next render works
    (fine,) = asyncio.run(pool.run("a", "messages", spec("hi {{ contact.name }}"), [ITEM]))
    assert isinstance(fine, message.Message) and fine.text == "hi A"


def test_one_account_never_holds_every_slot(pool: renderpool.RenderPool) -> None:
    async def scenario() -> tuple[list[Any], bool]:
        bombs = [asyncio.create_task(pool.run("bomber", "messages",
                                              spec(f"{{# {i} #}}{MACRO}", "bomber"), [ITEM]))
                 for i in range(3)]
        await asyncio.sleep(0)  # the bombs queue first
        calm = await pool.run("calm", "messages", spec("hi", "calm"), [ITEM])
        pending = not all(b.done() for b in bombs)  # ordering: calm came back first
        await asyncio.gather(*bombs)
        return calm, pending

    calm, bombs_pending = asyncio.run(scenario())
    assert isinstance(calm[0], message.Message)
    assert bombs_pending


def _cpu(pool: renderpool.RenderPool) -> float:
    total = 0.0
    for slot in pool._slots:
        if slot.proc is not None:
            times = psutil.Process(slot.proc.pid).cpu_times()
            total += times.user + times.system
    return total


def test_a_render_over_budget_is_answered_from_memory(pool: renderpool.RenderPool) -> None:
    bomb = spec(MACRO)

    async def twice() -> tuple[float, float]:
        await pool.start()
        before = _cpu(pool)
        with pytest.raises(errors.RenderBudget):
            await renderpool.one(pool, "a", "messages", bomb, ITEM)
        first = _cpu(pool) - before
        with pytest.raises(errors.RenderBudget):
            await renderpool.one(pool, "a", "messages", bomb, ITEM)
        return first, _cpu(pool) - before - first

    first, second = asyncio.run(twice())
    assert first >= 0.1  # a million steps (or the second of CPU time) were rendered
    assert second < first / 10  # not rendered again


def test_a_render_process_that_cannot_start_puts_every_item_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a real interpreter that exits at once: it finds no standard library
    monkeypatch.setenv("PYTHONHOME", "/nonexistent")
    p = renderpool.RenderPool(processes=2, timeout_ms=1000)
    try:
        results = asyncio.run(p.run("a", "messages", spec("hi"), [ITEM, ITEM]))
        assert all(isinstance(r, renderpool.Failure) and r.skipped for r in results), results
        # the worker's builder turns them into `release` (pending again), never `unknown`
        recipients = [dispatch.Recipient(i, f"{i}@example.com", None) for i in (1, 2)]
        content = message.Content(str(uuid.uuid4()), "a", "S", "f@example.com", "hi", None)
        built = asyncio.run(dispatch.Builder(p).build(content, recipients))
        assert [b.outcome for b in built if isinstance(b, dispatch.Outcome)] == \
            ["release", "release"]
    finally:
        p.close()


def test_a_kill_blames_the_item_being_rendered_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # a render process whose own budget is long (5 s) and a pool that waits 0.15 s: the bomb
    # is killed by the pool, while the three renders before it wait in the process's chunk
    p = renderpool.RenderPool(processes=2, timeout_ms=5000)
    monkeypatch.setattr(renderpool, "SLACK", 0.1)
    bomb = spec("{% if contact.name == 'bomb' %}" + MACRO + "{% endif %}hi")
    items = [(i, f"{i}@example.com", "bomb" if i == 3 else "calm", None, None, None)
             for i in range(6)]

    async def scenario() -> list[Any]:
        await p.start()
        for slot in p._slots:
            slot.timeout_ms = 30  # the pool's wait; the processes keep their 5 s
        return await p.run("a", "messages", bomb, items)

    try:
        results = asyncio.run(scenario())
    finally:
        p.close()
    blamed = [i for i, r in enumerate(results)
              if isinstance(r, renderpool.Failure) and not r.skipped]
    assert blamed == [3], results
    assert results[3].budget == "cpu_time"
    # the others were rendered (sent before the kill) or put back, never failed
    assert all(isinstance(r, message.Message) or r.skipped for r in results[:3] + results[4:])


@pytest.mark.parametrize("value", ["1", "0", "65"])
def test_fewer_than_two_render_processes_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    # one process would be every slot for one account (its share is half, at least one)
    monkeypatch.setenv("PGCAST_RENDER_PROCESSES", value)
    with pytest.raises(errors.InvalidValue, match="PGCAST_RENDER_PROCESSES: must be an "
                                                  "integer from 2 to 64"):
        renderpool.RenderPool()
