"""The render pool: tenants' templates rendered in processes with hard limits, never on the
event loop, with a share per account so one account never holds every slot.

Each slot is a render process (mail.renderproc) running one job at a time under the sandbox's
budget (CPU time per message, steps, value sizes, output) and an address-space limit. The
event loop hands a job to an idle slot and awaits it; a thread of the pool's own waits on the
slot's pipe (it runs no tenant code) and kills the process when a result does not come within
the CPU budget plus slack: the backstop for any step the sandbox cannot interrupt. A killed
or dead process is replaced before its slot is used again. An account holds at most `share`
slots at once (default half of them), so another account's render always finds one.

Settings: PGCAST_RENDER_TIMEOUT_MS (CPU ms per message, default 200),
PGCAST_RENDER_PROCESSES (slots, 2 to 64, default 2), PGCAST_RENDER_MEMORY_MB (address space
of a render process, default 256).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import mmap
import multiprocessing.connection
import os
import pickle
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from pgcast.mail import errors, message, renderproc, template

DEFAULT_PROCESSES = 2
DEFAULT_MEMORY_MB = 256  # address space, not RSS: a render process maps about 45 MB
STREAK = 3  # budget failures in a row after which a broadcast's group stops rendering
SLACK = 1.0  # seconds past the CPU budget before a silent render process is killed
START_TIMEOUT = 60.0  # seconds a new render process may take to say ready
REMEMBER = 30.0  # seconds a single render over budget is answered from memory
REMEMBER_MAX = 1000  # such answers kept at most

Spec = renderproc.Spec
Failure = renderproc.Failure


def _int_env(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise errors.InvalidValue(name, f"must be an integer from {low} to {high}")
    return value


def spec(content: message.Content) -> Spec:
    """What a render process needs to render `content` (compiled there once per content)."""
    return renderproc.spec_of(content)


def _fingerprint(kind: str, spec: Any, items: list[Any]) -> bytes | None:
    """What makes a render's result: its kind, content and item (not the spec's cache key)."""
    what = spec.kwargs if isinstance(spec, Spec) else spec
    try:
        return hashlib.sha256(pickle.dumps((kind, what, items))).digest()
    except (pickle.PicklingError, TypeError, AttributeError):
        return None


class _Slot:
    """One render process and its pipe; used by one job at a time."""

    def __init__(self, timeout_ms: int, memory_bytes: int) -> None:
        self.timeout_ms = timeout_ms
        self.memory_bytes = memory_bytes
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()  # a job and a background start never use it at once
        self.conn: multiprocessing.connection.Connection | None = None
        self.board: mmap.mmap | None = None  # the index of the item the process is rendering

    def start(self) -> None:
        """Start the process and wait for it to say ready (blocking: a pool thread)."""
        # its own interpreter (`python -m mail.renderproc`), not a fork: nothing of the
        # parent's threads, loop, connections or main module comes along.
        # The board: a shared page where the process writes the index of the item it starts
        # (results come in chunks: what was received does not say which item a kill stopped)
        with tempfile.TemporaryFile() as shared:
            shared.truncate(renderproc.BOARD)
            board = mmap.mmap(shared.fileno(), renderproc.BOARD)
            mine, theirs = socket.socketpair()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "pgcast.mail.renderproc", str(theirs.fileno()),
                     str(self.timeout_ms), str(self.memory_bytes), str(shared.fileno())],
                    pass_fds=(theirs.fileno(), shared.fileno()), stdin=subprocess.DEVNULL)
            except BaseException:
                mine.close()
                board.close()
                raise
            finally:
                theirs.close()
        conn = multiprocessing.connection.Connection(mine.detach())
        try:
            if not conn.poll(START_TIMEOUT) or conn.recv() != "ready":
                raise EOFError
        except (EOFError, OSError):
            proc.kill()
            proc.wait()
            conn.close()
            board.close()
            raise RuntimeError("a render process did not start") from None
        self.proc, self.conn, self.board = proc, conn, board

    def start_idle(self) -> None:
        """Start the process unless a job is using (or started) the slot."""
        if self.lock.acquire(blocking=False):
            try:
                if self.conn is None:
                    self.start()
            finally:
                self.lock.release()

    def kill(self) -> None:
        """Stop the process now (SIGKILL) and forget it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        if self.conn is not None:
            self.conn.close()
        if self.board is not None:
            self.board.close()
        self.proc = self.conn = self.board = None

    def started_item(self) -> int:
        """The index of the item the process last started (-1: none of this job)."""
        if self.board is None:
            return -1
        return int(struct.unpack_from("q", self.board)[0])

    def exchange(self, job: tuple[Any, ...], n: int) -> list[Any]:
        """Send a job and collect its n results (blocking: a pool thread); a result that does
        not come in time kills the process, and the rest fail."""
        with self.lock:
            return self._exchange(job, n)

    def _exchange(self, job: tuple[Any, ...], n: int) -> list[Any]:
        results: list[Any] = []
        try:
            if self.conn is None:
                self.start()
            assert self.conn is not None and self.board is not None
            struct.pack_into("q", self.board, 0, -1)
            wait = self.timeout_ms / 1000 + renderproc.FLUSH + SLACK
            self.conn.send(job)
            while len(results) < n:
                if not self.conn.poll(wait):
                    self._blame(results, n, Failure(
                        f"render budget exceeded (cpu_time): no result within "
                        f"{self.timeout_ms} ms of CPU time (PGCAST_RENDER_TIMEOUT_MS); the "
                        "render process was stopped", "cpu_time"))
                    break
                results.extend(self.conn.recv())
        except (EOFError, OSError) as exc:  # it died: the address-space limit, or killed
            if self.proc is None:  # it could not start: nothing was rendered
                self.kill()
                return self._unrendered([], n, f"the render process could not start: {exc}")
            self._blame(results, n, Failure("render budget exceeded (memory): the render "
                                            "process stopped (PGCAST_RENDER_MEMORY_MB)",
                                            "memory"))
        except Exception as exc:  # noqa: BLE001 - no start, or a job it cannot take: not rendered
            self.kill()
            return self._unrendered(results, n, f"{exc}"[:200])
        return self._unrendered(results, n, "the render process was stopped")

    def _blame(self, results: list[Any], n: int, failure: Failure) -> None:
        """Stop the process; the item it was rendering gets `failure`, and the ones it had
        rendered but not yet sent are not rendered (put back, not blamed)."""
        culprit = self.started_item()
        self.kill()
        if len(results) <= culprit < n:
            self._unrendered(results, culprit, "the render process was stopped")
            results.append(failure)

    @staticmethod
    def _unrendered(results: list[Any], n: int, why: str) -> list[Any]:
        while len(results) < n:
            results.append(Failure(f"not rendered: {why}", None, True))
        return results


class RenderPool:
    """Render processes shared by the whole process, at most `share` slots per account."""

    def __init__(self, processes: int | None = None, share: int | None = None,
                 timeout_ms: int | None = None, memory_mb: int | None = None) -> None:
        # at least 2: an account's share is half the slots, and one slot would be every slot
        self.processes = processes or _int_env("PGCAST_RENDER_PROCESSES", DEFAULT_PROCESSES,
                                               2, 64)
        self.share = share or max(1, self.processes // 2)
        self.timeout_ms = timeout_ms or template.timeout_ms()
        memory = memory_mb or _int_env("PGCAST_RENDER_MEMORY_MB", DEFAULT_MEMORY_MB, 64, 65536)
        self._slots = [_Slot(self.timeout_ms, memory << 20) for _ in range(self.processes)]
        # threads that wait on the pipes: one per slot, never running tenant code
        self._threads = concurrent.futures.ThreadPoolExecutor(self.processes,
                                                              thread_name_prefix="render")
        self._idle: asyncio.Queue[_Slot] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Task[None] | None = None
        self._accounts: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self._over_budget: dict[bytes, tuple[float, Failure]] = {}  # fingerprint -> until

    def _queue(self) -> asyncio.Queue[_Slot]:
        loop = asyncio.get_running_loop()
        if self._idle is None or self._loop is not loop:  # a new loop (asyncio.run again)
            self._loop, self._idle, self._accounts = loop, asyncio.Queue(), {}
            for slot in self._slots:
                self._idle.put_nowait(slot)
            # every process starts now, in the background: an account's first render must not
            # wait for a process to start because another account's render holds a started one
            self._starting = loop.create_task(self.start())
        return self._idle

    @contextlib.asynccontextmanager
    async def _account(self, account: str) -> AsyncIterator[None]:
        """One of the account's `share` slots (waiting for one of its own renders to end)."""
        sem, users = self._accounts.get(account) or (asyncio.Semaphore(self.share), 0)
        self._accounts[account] = (sem, users + 1)
        try:
            async with sem:
                yield
        finally:
            sem, users = self._accounts[account]
            if users <= 1:
                del self._accounts[account]
            else:
                self._accounts[account] = (sem, users - 1)

    async def run(self, account: str, kind: str, spec: Any, items: list[Any],
                  stop_after: int = 0) -> list[Any]:
        """One job's results (one per item, a Failure for each that could not be made)."""
        if not items:
            return []
        idle = self._queue()
        # the same single render that just went over its budget goes over it again: answered
        # from memory for a while (seven parallel previews of a bomb cost one render)
        same = _fingerprint(kind, spec, items) if len(items) == 1 else None
        async with self._account(account):
            known = self._over_budget.get(same) if same else None
            if known is not None and known[0] > time.monotonic():
                return [known[1]]
            slot = await idle.get()
            try:
                loop = asyncio.get_running_loop()
                results: list[Any] = await loop.run_in_executor(
                    self._threads, slot.exchange, (kind, spec, items, stop_after), len(items))
            finally:
                idle.put_nowait(slot)
        if same and isinstance(results[0], Failure) and results[0].budget:
            self._remember(same, results[0])
        return results

    def _remember(self, same: bytes, failure: Failure) -> None:
        now = time.monotonic()
        if len(self._over_budget) >= REMEMBER_MAX:
            self._over_budget = {k: v for k, v in self._over_budget.items() if v[0] > now}
        if len(self._over_budget) < REMEMBER_MAX:
            self._over_budget[same] = (now + REMEMBER, failure)

    async def start(self) -> None:
        """Start every render process not started yet (a slot that fails starts on its job)."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._threads, s.start_idle)
                               for s in self._slots if s.conn is None),
                             return_exceptions=True)

    def close(self) -> None:
        """Stop every render process (after the jobs and starts in progress: each is bounded
        by the budget's kill or START_TIMEOUT)."""
        self._threads.shutdown(wait=True, cancel_futures=True)
        for slot in self._slots:
            slot.kill()


async def one(pool: RenderPool, account: str, kind: str, spec: Any, item: Any) -> Any:
    """A single result; raises the failure (RenderBudget naming the budget, or RenderError)."""
    (result,) = await pool.run(account, kind, spec, [item])
    if isinstance(result, Failure):
        if result.budget and result.budget != "render_budget":
            raise errors.RenderBudget(result.budget, result.reason.partition("): ")[2]
                                      or result.reason)
        raise errors.RenderError(result.reason)
    return result
