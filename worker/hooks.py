"""Webhook delivery: a task of the worker process, apart from the mail engine.

Endpoints are claimed with SKIP LOCKED under a lease, one worker per endpoint: its deliveries
go out one at a time, in their order, so an endpoint sees events in the order they were
written. Each attempt's outcome is recorded under the lease before the endpoint's next POST;
the outcomes of attempts that end while a record is being written go together in the next
one (group commit: one pgcast_webhook_record_v2 statement per batch, not per delivery). A
worker killed mid-delivery records nothing, and once the lease expires another worker sends
the same delivery again (at least once). This loop has its own connections and its own slots:
a slow or dead endpoint holds one slot for at most the timeout per attempt, never the mail
engine's connections or calls, and one account holds at most PGCAST_WEBHOOKS_PER_ACCOUNT slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from pgcast.sql import db, hooks
from pgcast.sql.queries import QUERIES
from pgcast.worker import errors, hookhttp

log = logging.getLogger("pgcast.webhooks")

BATCH = 50  # deliveries read at once from one endpoint's queue
PRUNE_EVERY = 600.0  # seconds between prunes of old deliveries and events
PRUNE_BATCH = 5000  # rows one prune statement deletes at most
QUANTUM = 5.0  # seconds an endpoint keeps its slot while others may wait for one


def _env(name: str, default: float, low: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise errors.ConfigError(f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value) or value < low:
        raise errors.ConfigError(f"{name} must be a number >= {low:g}, not {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Delivery settings, from PGCAST_WEBHOOKS_* variables."""

    concurrency: int = 32  # endpoints delivered to at once by this process
    per_account: int = 4  # of which one account's
    poll: float = 1.0  # seconds between looks for due deliveries
    lease: float = 60.0  # seconds an endpoint stays with a worker without a record
    timeout: float = 10.0  # seconds per attempt
    retry_base: float = 10.0  # seconds before the first retry (doubled each time, <= 6 h)
    give_up: float = 3 * 86400.0  # seconds after a delivery's first attempt
    keep_days: float = 30.0  # finished deliveries (and events no delivery holds) kept

    @classmethod
    def from_env(cls) -> Settings:
        """The settings, or ConfigError naming the bad variable."""
        s = cls(
            concurrency=int(_env("PGCAST_WEBHOOKS_CONCURRENCY", cls.concurrency, 1)),
            per_account=int(_env("PGCAST_WEBHOOKS_PER_ACCOUNT", cls.per_account, 1)),
            poll=_env("PGCAST_WEBHOOKS_POLL", cls.poll, 0.01),
            lease=_env("PGCAST_WEBHOOKS_LEASE", cls.lease, 1),
            timeout=_env("PGCAST_WEBHOOKS_TIMEOUT", cls.timeout, 0.1),
            retry_base=_env("PGCAST_WEBHOOKS_RETRY_BASE", cls.retry_base, 0),
            give_up=_env("PGCAST_WEBHOOKS_GIVE_UP", cls.give_up, 0),
            keep_days=_env("PGCAST_WEBHOOKS_KEEP_DAYS", cls.keep_days, 0))
        if s.lease <= s.timeout:
            raise errors.ConfigError("PGCAST_WEBHOOKS_LEASE must be longer than "
                                     "PGCAST_WEBHOOKS_TIMEOUT (an attempt must end in its lease)")
        return s


@dataclass(frozen=True)
class Outcome:
    """One attempt waiting for its record."""

    endpoint: Any
    token: Any
    delivery: int
    answer: hookhttp.Answer


class Recorder:
    """Writes attempts' outcomes in batches, one statement each (a connection of the pool, which
    has one for it beside the drains' and the claim's): an outcome handed over while a batch
    is being written goes in the next one (group commit)."""

    def __init__(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
                 settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.waiting: list[tuple[Outcome, asyncio.Future[str | None]]] = []
        self.task: asyncio.Task[None] | None = None
        self.statements = 0

    async def record(self, outcome: Outcome) -> str | None:
        """The outcome's record: 'delivered', 'retry', 'disabled', or None (lease lost)."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.waiting.append((outcome, future))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._write(), name="webhook-records")
        return await future

    async def _write(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting, []
            try:
                rows = await self._statement([o for o, _ in batch])
            except Exception as exc:  # each waiting delivery sees the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for o, future in batch:
                if not future.done():
                    future.set_result(rows.get(o.delivery))

    async def _statement(self, batch: list[Outcome]) -> dict[int, str]:
        s = self.settings
        async with self.pool.connection() as conn:
            cur = await conn.execute(QUERIES["hooks_record"], {
                "endpoints": [o.endpoint for o in batch], "tokens": [o.token for o in batch],
                "deliveries": [o.delivery for o in batch],
                "ok": [o.answer.ok for o in batch], "status": [o.answer.status for o in batch],
                "error": [o.answer.error for o in batch],
                "latency_ms": [o.answer.latency_ms for o in batch],
                "response": [o.answer.response for o in batch],
                "lease": s.lease, "base": s.retry_base, "give_up": s.give_up})
            self.statements += 1
            return {int(r["delivery_id"]): str(r["outcome"]) for r in await cur.fetchall()}


class Deliverer:
    """Claims endpoints with due deliveries and delivers to each one in order."""

    def __init__(self, url: str, settings: Settings, stopping: asyncio.Event,
                 name: str) -> None:
        self.url = url
        self.settings = settings
        self.stopping = stopping
        self.name = name
        self.poster = hookhttp.Poster(settings.timeout)
        self.slots: dict[Any, asyncio.Task[None]] = {}
        self.accounts: Counter[str] = Counter()
        self.wake = asyncio.Event()
        self.delivered = 0
        self.recorder: Recorder | None = None  # from run(), on its pool

    async def run(self) -> None:
        """Until stopping: claim, deliver, restart after a database outage."""
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self.url, min_size=1, max_size=self.settings.concurrency + 2, open=False,
            kwargs={"autocommit": True, "row_factory": dict_row, **db.CONNECT_KWARGS},
            reconnect_timeout=3600, name="pgcast-webhooks")
        await pool.open(wait=False)
        self.recorder = Recorder(pool, self.settings)
        pruned = -math.inf  # never
        try:
            while not self.stopping.is_set():
                try:
                    await self._claim(pool)
                    if time.monotonic() - pruned > PRUNE_EVERY:
                        pruned = time.monotonic()
                        await self.prune(pool)
                except psycopg.OperationalError as exc:
                    log.warning("webhook claim failed (%s); will retry", exc)
                self.wake.clear()
                waits = [asyncio.ensure_future(self.stopping.wait()),
                         asyncio.ensure_future(self.wake.wait())]
                await asyncio.wait(waits, timeout=self.settings.poll,
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
            # finish the attempts in hand (each ends within the timeout); leases are given back
            if self.slots:
                await asyncio.wait(list(self.slots.values()), timeout=self.settings.timeout + 2)
        finally:
            for task in list(self.slots.values()):
                task.cancel()
            for task in list(self.slots.values()):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.recorder is not None and self.recorder.task is not None:
                # every drain has its record by now (it waited for it) or was cancelled
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.recorder.task
            await self.poster.aclose()
            await pool.close()

    async def prune(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]]) -> int:
        """Delete finished deliveries older than keep_days, then the events no delivery holds
        any more, in batches (every worker may prune: the statements are idempotent)."""
        params = {"days": self.settings.keep_days, "limit": PRUNE_BATCH}
        deleted = 0
        async with pool.connection() as conn:
            for name in ("hooks_prune_deliveries", "hooks_prune_events"):
                while not self.stopping.is_set():
                    cur = await conn.execute(QUERIES[name], params)
                    deleted += cur.rowcount
                    if cur.rowcount < PRUNE_BATCH:
                        break
        return deleted

    async def _claim(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]]) -> None:
        free = self.settings.concurrency - len(self.slots)
        if free <= 0:
            return
        full = [a for a, n in self.accounts.items() if n >= self.settings.per_account]
        token = uuid.uuid4()
        async with pool.connection() as conn:
            cur = await conn.execute(QUERIES["hooks_claim"], {
                "limit": free, "full": full, "token": token, "worker": self.name,
                "lease": self.settings.lease})
            rows = await cur.fetchall()
            for row in rows:
                if self.accounts[row["account"]] >= self.settings.per_account:
                    await conn.execute(QUERIES["hooks_release"], {"id": row["id"], "token": token})
                    continue
                self.accounts[row["account"]] += 1
                task = asyncio.create_task(self._drain(pool, dict(row)),
                                           name=f"webhook-{row['id']}")
                self.slots[row["id"]] = task
                task.add_done_callback(functools.partial(self._done, dict(row)))

    def _done(self, row: dict[str, Any], _task: asyncio.Task[None]) -> None:
        self.slots.pop(row["id"], None)
        self.accounts[row["account"]] -= 1
        if self.accounts[row["account"]] <= 0:
            del self.accounts[row["account"]]
        self.wake.set()  # a free slot: look for due endpoints now

    async def _drain(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
                     ep: dict[str, Any]) -> None:
        """Deliver an endpoint's due deliveries in order, for up to QUANTUM seconds, on one
        connection of the pool."""
        keep = False  # the lease was given back by the record (retry, disabled) or lost
        try:
            async with pool.connection() as conn:
                try:
                    keep = await self._deliver_due(conn, ep)
                finally:
                    if not keep:
                        await conn.execute(QUERIES["hooks_release"],
                                           {"id": ep["id"], "token": ep["lease_token"]})
        except psycopg.OperationalError as exc:
            log.warning("webhook delivery to endpoint %s stopped (%s); its lease will expire",
                        ep["id"], exc)

    async def _deliver_due(self, conn: psycopg.AsyncConnection[Any],
                           ep: dict[str, Any]) -> bool:
        """Deliver until nothing is due, a failure, or the quantum ends; True when the lease
        is no longer ours to give back (a failure's record gave it back, or it was lost)."""
        started = time.monotonic()
        while not self.stopping.is_set() and time.monotonic() - started < QUANTUM:
            cur = await conn.execute(QUERIES["hooks_next"], {"id": ep["id"], "limit": BATCH})
            rows = await cur.fetchall()
            if not rows:
                return False
            for row in rows:
                if not row["due"] or self.stopping.is_set() \
                        or time.monotonic() - started >= QUANTUM:
                    return False
                if await self._attempt(ep, row) != "delivered":
                    return True
        return False

    async def _attempt(self, ep: dict[str, Any], row: dict[str, Any]) -> str | None:
        body = row["body"].encode()
        headers = {"Content-Type": "application/json",
                   "Pgcast-Event-Id": str(row["event_id"]),
                   "Pgcast-Signature": hooks.signature(ep["secret"], int(time.time()), body)}
        answer = await self.poster.post(ep["url"], headers, body, str(ep["id"]))
        assert self.recorder is not None
        outcome = await self.recorder.record(Outcome(ep["id"], ep["lease_token"], row["id"],
                                                      answer))
        if outcome == "delivered":
            self.delivered += 1
        elif outcome == "disabled":
            log.warning("webhook endpoint %s disabled: failing for %gs (%s)", ep["id"],
                        self.settings.give_up, answer.error)
        elif outcome is None:
            log.warning("webhook endpoint %s: lease lost; another worker delivers", ep["id"])
        return outcome


async def run(url: str, stopping: asyncio.Event, name: str) -> None:
    """Deliver webhooks until stopping (the worker process's side task)."""
    await Deliverer(url, Settings.from_env(), stopping, name).run()
