"""Transactional messages on the broadcast engine's pattern: claim (SKIP LOCKED, a lease), take
tokens (ahead of broadcasts, up to their share), hand off behind the fence (committed before
the provider call), send side by side through the engine's sender and pacer, record.

A NOTIFY from pgcast_send_message wakes the loop at once; the poll interval is the fallback.
What a crash leaves: claimed rows are claimable again when their lease ends; handed-off rows
(`sending`) become `unknown` when it ends (the sweep), never re-sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pgcast.mail import errors as mail_errors
from pgcast.mail import transactional, unsubscribe
from pgcast.worker import dispatch, pg, ratelimit

log = logging.getLogger("pgcast.messages")

CLAIM = 50  # the most messages one claim takes
WAIT_MAX = 1.0  # seconds: the longest sleep on an empty bucket
SWEEP_EVERY = 5.0  # seconds between sweeps of lost handoffs from this process
BLOCKED_RETRY = 60.0  # seconds: a message put back after account-level trouble waits this long
RATE_EVERY = 1.0  # seconds: how often the loop reads the global rate (the pacer spaces calls
# by it; a process with no broadcast to pick would otherwise never read it)
DEADLINE = 2.0  # seconds: a handed-off call not started by then is put back, never called


@dataclass
class Counts:
    """What the loop did (the worker's exit line and tests)."""

    sent: int = 0
    failed: int = 0
    skipped: int = 0
    retried: int = 0
    woken: int = 0  # claims that followed a NOTIFY (not the poll)


class Loop:
    """One worker process's message loop."""

    def __init__(self, db: pg.Db, name: str, sender: dispatch.Sender, rates: dict[str, float],
                 wake: asyncio.Event, stopping: asyncio.Event, *, lease: float, poll: float,
                 once: bool = False, most: int = 128,
                 schedule: ratelimit.Schedule | None = None) -> None:
        self.db = db
        self.name = name
        self.sender = sender
        self.rates = rates
        self.wake = wake
        self.stopping = stopping
        self.lease = lease
        self.poll = poll
        self.once = once
        self.counts = Counts()
        self.tokens: set[uuid.UUID] = set()  # claims whose leases we renew
        self._in_flight: set[asyncio.Task[None]] = set()
        self._swept = -math.inf
        self.idle = False  # waiting for a NOTIFY or the poll
        self._rate_read = -math.inf
        self.busy = 0  # messages handed off and not yet recorded, in this process
        self.most = most  # the most of them (a slow provider must not gather a crowd in doubt)
        # the global wire schedule (the engine's, shared with its broadcasts' takes)
        self.schedule = schedule or ratelimit.Schedule()
        self._room = asyncio.Event()
        # a marketing message's one-click link: the keys and URL in force, read once
        self._unsubscribe: tuple[unsubscribe.Keys, str] | str | None = None  # str: why not

    async def run(self) -> None:
        """Claim and send until stopped (with --once: until nothing is claimable)."""
        renewer = asyncio.create_task(self._renew(), name="messages-renew")
        woken = True  # the first look follows the start, as a wake-up would
        try:
            while not self.stopping.is_set():
                try:
                    await self._sweep()
                    got = await self.claim_and_send(woken)
                except pg.UNREACHABLE as exc:
                    log.warning("messages: postgres unreachable (%s); backing off", exc)
                    await self._sleep(1.0)
                    continue
                except Exception:  # noqa: BLE001 - a tenant's row must not stop the process
                    log.exception("messages: unexpected error; carrying on")
                    await self._sleep(0.5)
                    continue
                if got:
                    woken = False
                    continue
                if self.once:
                    break
                woken = await self._idle_wait()
            while self._in_flight:
                await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _idle_wait(self) -> bool:
        """Until a NOTIFY, the poll interval or the stop; True when woken by a NOTIFY."""
        if not self.wake.is_set():
            self.idle = True
            waiters = [asyncio.create_task(self.wake.wait()),
                       asyncio.create_task(self.stopping.wait())]
            try:
                await asyncio.wait(waiters, timeout=self.poll,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                self.idle = False
        woken = self.wake.is_set()
        self.wake.clear()
        return woken

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < SWEEP_EVERY:
            return
        self._swept = now
        rows = await self.db.q("message_sweep")
        if rows and rows[0][0]:
            log.warning("messages: %s handed off by a lost worker are now unknown", rows[0][0])

    async def _read_rate(self) -> None:
        now = time.monotonic()
        if now - self._rate_read < RATE_EVERY:
            return
        self._rate_read = now
        bucket = await self.db.q("rate_get", {"name": "global"})
        if bucket:
            self.rates["global"] = float(bucket[0][1])

    async def _wait_for_room(self) -> int:
        """Rows this process may claim now (0: stopping): at most `most` in flight."""
        while self.busy >= self.most and not self.stopping.is_set():
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout=1.0)
        return 0 if self.stopping.is_set() else min(CLAIM, self.most - self.busy)

    async def claim_and_send(self, woken: bool = False) -> int:
        """One claim: tokens, handoffs and calls for what it took; how many it claimed."""
        await self._read_rate()
        limit = await self._wait_for_room()
        if not limit:
            return 0
        token = uuid.uuid4()
        self.tokens.add(token)
        rows = await self.db.dicts("message_claim", {"limit": limit, "token": token,
                                                     "worker": self.name, "lease": self.lease})
        if not rows:
            self.tokens.discard(token)
            return 0
        if woken:
            self.counts.woken += 1
            log.info("messages: woken by NOTIFY, claimed %d", len(rows))
        attempts = {r["id"]: int(r["attempts"]) for r in rows}
        remaining = [r["id"] for r in rows]
        groups: list[asyncio.Task[None]] = []
        try:
            await self._load_unsubscribe()
            while remaining and not self.stopping.is_set():
                granted, wire = await self._take(len(remaining))
                if not granted:
                    break
                group, remaining = remaining[:granted], remaining[granted:]
                try:
                    handed = await self.db.dicts("message_handoff", {"token": token,
                                                                     "ids": group})
                except pg.UNREACHABLE:
                    # did it commit? Either way no call was made: put the group back
                    await self.db.q_retry("message_unhandoff", {"token": token, "ids": group})
                    raise
                self.counts.skipped += len(group) - len(handed)
                if handed:
                    self.busy += len(handed)
                    task = asyncio.create_task(self._send_and_record(token, handed, attempts,
                                                                     wire))
                    groups.append(task)
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
        finally:
            if remaining:
                await self.db.q_retry("message_release", {"token": token, "ids": remaining})
            if groups:
                done = asyncio.gather(*groups, return_exceptions=True)
                done.add_done_callback(lambda _: self.tokens.discard(token))
            else:
                self.tokens.discard(token)
        return len(rows)

    async def _load_unsubscribe(self) -> None:
        """The keys (PGCAST_UNSUBSCRIBE_SECRET, else the database's generated key) and the URL
        (PGCAST_PUBLIC_URL) of marketing messages' links, read once, before any handoff: a
        failure here must not leave a handed-off row uncalled."""
        if self._unsubscribe is not None:
            return
        secret = os.environ.get("PGCAST_UNSUBSCRIBE_SECRET")
        stored = None
        if not (secret and secret.strip()):
            rows = await self.db.q("unsubscribe_key")
            stored = str(rows[0][0]) if rows else None
        try:
            self._unsubscribe = (unsubscribe.keys_from(secret, stored),
                                 unsubscribe.public_url(os.environ.get("PGCAST_PUBLIC_URL")))
        except mail_errors.InvalidValue as exc:  # a marketing message cannot be built: why
            self._unsubscribe = str(exc)

    def _unsubscribe_url(self, message_id: uuid.UUID) -> str:
        """A marketing message's one-click unsubscribe URL; raises mail.errors.InvalidValue."""
        if not isinstance(self._unsubscribe, tuple):
            raise mail_errors.InvalidValue("unsubscribe link", str(self._unsubscribe))
        keys, base_url = self._unsubscribe
        return unsubscribe.link(base_url, keys.message(message_id))

    async def _take(self, want: int) -> tuple[int, ratelimit.Slots | None]:
        """Tokens for up to `want` messages (0: stopping) and their wire slots (None: no
        limit); waits on an empty bucket."""
        while not self.stopping.is_set():
            if self.rates.get("global", 1.0) == 0:
                return want, None
            rows = await self.db.q("message_take_tokens", {"name": "global", "want": want,
                                                           "lead": self.schedule.lead()})
            received = time.monotonic()
            granted, wait = int(rows[0][0]), float(rows[0][1])
            if granted:
                return granted, self.schedule.slots(rows[0][2], rows[0][3], rows[0][4],
                                                    received, rows[0][5])
            await self._sleep(min(WAIT_MAX, max(0.002, wait)))
        return 0, None

    async def _send_and_record(self, token: uuid.UUID, handed: list[dict[str, Any]],
                               attempts: dict[uuid.UUID, int],
                               wire: ratelimit.Slots | None = None) -> None:
        """The provider calls of one handed-off group, side by side, then one record (each
        call at its slot in `wire`, when the take booked slots)."""
        try:
            await self._calls_and_record(token, handed, attempts, wire)
        finally:
            self.busy -= len(handed)
            self._room.set()

    async def _calls_and_record(self, token: uuid.UUID, handed: list[dict[str, Any]],
                                attempts: dict[uuid.UUID, int],
                                wire: ratelimit.Slots | None = None) -> None:
        due = time.monotonic() + DEADLINE
        numbered = {i: row for i, row in enumerate(handed)}
        tries = {i: attempts.get(row["id"], int(row["attempts"])) for i, row in numbered.items()}
        stop: list[dispatch.Outcome] = []
        loop = asyncio.get_running_loop()
        calls: list[asyncio.Future[dispatch.Outcome]] = []
        for i, row in numbered.items():
            try:
                link = (self._unsubscribe_url(row["id"])
                        if row.get("category") == "marketing" else None)
                msg = transactional.compose(row, i, link)
            except mail_errors.MailError as exc:
                done: asyncio.Future[dispatch.Outcome] = loop.create_future()
                done.set_result(dispatch.cannot_build(i, str(exc)))
                calls.append(done)
                continue
            if self.sender.executor is not None and self.sender.provider.blocking:
                calls.append(loop.run_in_executor(self.sender.executor, self.sender.paced, msg,
                                                  tries, stop, due,
                                                  wire.at(i) if wire else None))
            else:
                done = loop.create_future()
                done.set_result(self.sender.send_one(msg, tries, stop))
                calls.append(done)
        outcomes = list(await asyncio.gather(*calls))
        blocked = next((o for o in outcomes if o.outcome == "release" and o.pause_reason), None)
        for o in outcomes:
            if o.outcome == "release" and blocked is not None:
                # the account is blocked: the whole group waits, the ones never called too
                # (put back at once, each would be claimed and called again: a hot loop of
                # refused calls, one per message)
                o.retry_in = BLOCKED_RETRY
                o.error = o.error or blocked.error
            if o.outcome == "sent":
                self.counts.sent += 1
            elif o.outcome == "failed":
                self.counts.failed += 1
            elif o.outcome in ("retry", "throttled"):
                self.counts.retried += 1
        try:
            await self.db.q_retry("message_record", {
                "token": token, "ids": [numbered[o.contact_id]["id"] for o in outcomes],
                "outcomes": [o.outcome for o in outcomes],
                "message_ids": [o.message_id for o in outcomes],
                "errors": [o.error for o in outcomes],
                "retry_in": [o.retry_in for o in outcomes]})
        except Exception:  # noqa: BLE001 - the rows stay sending: the sweep makes them unknown
            log.exception("messages: outcomes could not be recorded")
        if any(o.outcome == "throttled" for o in outcomes):
            with contextlib.suppress(Exception):
                await self.db.q_retry("drain_tokens", {"name": "global",
                                                       "seconds": self.sender.retries
                                                       .throttle_backoff})

    async def _renew(self) -> None:
        """Extend the leases of the claims in hand, every third of a lease."""
        while not self.stopping.is_set():
            await self._sleep(self.lease / 3)
            if not self.tokens:
                continue
            try:
                await self.db.q("message_renew", {"tokens": list(self.tokens),
                                                  "lease": self.lease})
            except pg.UNREACHABLE as exc:
                log.warning("message lease renewal failed (%s); will retry", exc)
