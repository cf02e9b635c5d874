"""One worker process's dispatch loops: pick a broadcast, claim, hand off groups behind the
fence, keep them in the provider's hands side by side, record.

The parts live in their own modules: worker.claims (which rows, how many), worker.ratelimit
(tokens per group), worker.inflight (group sizes and the in-flight window), worker.dispatch
(rendering and sending each message on its own), worker.pg (statements)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pgcast.worker import (
    claims,
    dispatch,
    inflight,
    messages,
    pg,
    picker,
    providers,
    ratelimit,
    recorder,
    render,
)

log = logging.getLogger("pgcast.worker")

NEVER = math.inf  # a halted epoch meaning "every epoch": the broadcast was cancelled
ERROR_BACKOFF = 1.0  # seconds: first pause of a broadcast after an unexpected error
ERROR_BACKOFF_CAP = 60.0  # seconds: the longest
MAX_IN_FLIGHT = 128  # provider calls in flight per process: 200/s at 300 ms needs 60


@dataclass
class Settings:
    """How one worker process behaves (flags and environment)."""

    concurrency: int = 4  # dispatch loops: claims (and broadcasts) worked on at once
    batch_size: int = 500  # the most rows one claim takes
    group_size: int | None = None  # rows per handoff; None = auto (see inflight.GroupSizer)
    group_ms: float = 250.0  # auto: target provider time per group, in milliseconds
    max_in_flight: int = MAX_IN_FLIGHT  # provider calls in flight at once in this process
    delay_ms: int = 0  # pause between batches of one loop
    max_retries: int = 5  # transient failures tolerated per recipient before `failed`
    max_broadcasts: int = 0  # broadcasts worked on at once; 0 = all
    once: bool = False  # drain what is claimable now, then exit
    lease: float = 30.0  # seconds a claim stays ours without renewal
    poll: float = 1.0  # seconds between looks when LISTEN says nothing
    retry_base: float = 2.0  # seconds: first transient backoff
    retry_cap: float = 300.0  # seconds: longest transient backoff
    throttle_backoff: float = 1.0  # seconds a provider throttle empties the global bucket for
    breaker: int = 0  # pause a broadcast after this many failed handoffs in a row; 0 = off
    sweeper: bool = True  # run the procrastinate sweeper in this process
    sweep_cron: str = "* * * * * */5"  # every 5 seconds


@dataclass
class Stats:
    """Counts for the worker's exit line."""

    sent: int = 0
    failed: int = 0
    retried: int = 0
    groups: int = 0
    # the provider's connections opened and retired, and transport failures by cause (ses)
    connections: dict[str, int] = field(default_factory=dict)
    # the global wire schedule: calls that reached the wire after their slot, the most one
    # was late (ms), and the longest lead this process asked for (ms)
    wire: dict[str, float] = field(default_factory=dict)


@dataclass
class State:
    """What the control listener tells the dispatch loops."""

    halted: dict[uuid.UUID, float] = field(default_factory=dict)  # broadcast -> dead epochs <=
    rates: dict[str, float] = field(default_factory=dict)  # bucket -> rate (0 = unlimited)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    messages: asyncio.Event = field(default_factory=asyncio.Event)  # a message was committed

    def is_halted(self, broadcast_id: uuid.UUID, epoch: int) -> bool:
        """True when work claimed at this epoch must not be handed off."""
        return self.halted.get(broadcast_id, 0) >= epoch


Handed = list[dispatch.Recipient]  # rows handed off


class Engine:
    """One worker process's dispatch loops over a shared pool."""

    db_class: type[pg.Db] = pg.Db  # how it runs named statements (metrics wrap it)

    def __init__(self, settings: Settings, provider: providers.Provider, pool: Any,
                 state: State | None = None) -> None:
        self.settings = settings
        self.provider = provider
        self.state = state or State()
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stopping = asyncio.Event()
        self.stats = Stats()
        self.pool = pool
        self.db = self.db_class(pool, self.stopping, settings.lease)
        self.claims = claims.Claims(self.db, self.name, settings.lease, self.state.is_halted)
        self.buckets = ratelimit.Buckets(self.db, self.state.rates, self.stopping,
                                         self.state.is_halted)
        self.sizer = inflight.GroupSizer(settings.group_size, settings.group_ms,
                                         settings.batch_size)
        self.window = inflight.Window(settings.max_in_flight)
        # each call through the window is recorded as it is answered, its slot freed then
        self.recorder = recorder.Recorder(self._record_batch, self.window)
        # one thread per call in flight: asyncio's default executor has cpu_count + 4
        self.executor = (concurrent.futures.ThreadPoolExecutor(
            settings.max_in_flight, thread_name_prefix="provider") if provider.blocking else None)
        self.pacer = ratelimit.Pacer(self.buckets.global_rate, self.buckets.schedule)
        # a provider that can pace at the wire does (ses: after boto3 has built and signed the
        # request); the others are paced by the sender, just before the call
        at_the_wire = getattr(provider, "pace_with", None)
        if at_the_wire is not None:
            # after the wait, the group's stop check: a refusal that came back meanwhile
            # stops the call before its request leaves
            at_the_wire(dispatch.at_the_wire(self.pacer.wait))
        self.sender = dispatch.Sender(provider, dispatch.Retries(
            settings.max_retries, settings.retry_base, settings.retry_cap,
            settings.throttle_backoff), self.executor,
            None if at_the_wire is not None else self.pacer, settings.group_ms / 1000)
        self.picker = picker.Picker(self.db, self.state.rates, settings.max_broadcasts,
                                    settings.poll, self._forget)
        self._idle_loops = 0
        # claims whose leases we renew: claim token -> its broadcast
        self.tokens_in_hand: dict[uuid.UUID, uuid.UUID] = {}
        self._groups: set[asyncio.Task[None]] = set()  # groups in flight after their claim
        # transactional messages: the same sender, pacer and bucket, a loop of their own
        self.messages = messages.Loop(self.db, self.name, self.sender, self.state.rates,
                                      self.state.messages, self.stopping,
                                      schedule=self.buckets.schedule,
                                      lease=settings.lease, poll=settings.poll,
                                      once=settings.once, most=settings.max_in_flight)

    def _forget(self, bid: uuid.UUID) -> None:
        """A broadcast no longer worked on: its takers' locks and render streaks go."""
        self.buckets.forget(bid)
        self.sender.builder.forget(bid)

    # -- the loops ---------------------------------------------------------------------

    async def run(self) -> Stats:
        """Run the dispatch loops until stopped (or, with --once, until drained)."""
        if self.settings.once:
            # drained first: the broadcast loops stop the process when they find nothing
            await self.messages.run()
        loops = [asyncio.create_task(self._loop(i), name=f"dispatch-{i}")
                 for i in range(self.settings.concurrency)]
        if not self.settings.once:
            loops.append(asyncio.create_task(self.messages.run(), name="messages"))
        try:
            await asyncio.gather(*loops)
            while self._groups:  # a stop lets the calls in flight finish and be recorded
                await asyncio.gather(*list(self._groups))
            await self.recorder.drain()
        finally:
            counts = getattr(self.provider, "connection_counts", None)
            if counts is not None:
                self.stats.connections = counts()
            self.stats.wire = {**self.buckets.schedule.figures(),
                               "put_back": self.sender.too_late}
            for task in loops:
                task.cancel()
            if self.executor is not None:
                self.executor.shutdown(wait=False)
        return self.stats

    async def _loop(self, slot: int) -> None:
        idle = False
        while not self.stopping.is_set():
            bid: uuid.UUID | None = None
            try:
                bid = await self._pick()
                if bid is None:
                    if not idle:
                        idle = True
                        self._idle_loops += 1
                    if self.settings.once and self._idle_loops >= self.settings.concurrency:
                        self.stopping.set()  # every loop found nothing: drained
                        return
                    await self._idle_wait()
                    continue
                if idle:
                    idle = False
                    self._idle_loops -= 1
                await self._work_one(bid)
                if self.settings.delay_ms:
                    await self._sleep(self.settings.delay_ms / 1000)
            except pg.UNREACHABLE as exc:
                log.warning("dispatch-%d: postgres unreachable (%s); backing off", slot, exc)
                await self._sleep(1.0)
            except Exception:  # noqa: BLE001 - nothing a tenant stores may stop a process
                # what the loop held was released (or recorded) on the way out of _work_one
                entry = self.picker.active.get(bid) if bid is not None else None
                if entry is not None:
                    entry.errors += 1
                    entry.not_before = time.monotonic() + dispatch.backoff(
                        entry.errors, ERROR_BACKOFF, ERROR_BACKOFF_CAP)
                log.exception("dispatch-%d: broadcast %s: unexpected error; leaving it alone "
                              "for a while and carrying on", slot, bid)
                await self._sleep(0.1)  # never a hot loop, even when every broadcast fails

    async def _pick(self) -> uuid.UUID | None:
        woken = self.state.wake.is_set()
        self.state.wake.clear()
        return await self.picker.pick(woken)

    async def _idle_wait(self) -> None:
        """Sleep until LISTEN wakes us, the poll interval passes, or we stop."""
        waiters = [asyncio.create_task(self.state.wake.wait()),
                   asyncio.create_task(self.stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=self.settings.poll,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self.picker.look_again()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def _work_one(self, bid: uuid.UUID) -> None:
        token = uuid.uuid4()
        self.tokens_in_hand[token] = bid
        groups: set[asyncio.Task[None]] = set()
        try:
            await self._claim_and_work(bid, token, groups)
        finally:
            # the loop goes on to its next claim while this one's last groups are in the
            # provider's hands (no stall per claim); the lease is renewed until they are recorded
            self._track(token, groups)
        entry = self.picker.active.get(bid)
        if entry is not None:
            entry.errors = 0

    def _rows_per_second(self, entry: claims.Active) -> float:
        """What this process can send of this broadcast (inf: no limit and no measurement)."""
        rate = self.buckets.global_rate()
        best = self.window.rows_per_second(rate) if self.provider.blocking \
            else (rate if rate > 0 else math.inf)
        return min(best, entry.rate_limit) if entry.rate_limit else best

    def _group_size(self, entry: claims.Active) -> int:
        """Rows for the next group: fixed; or auto, about --group-ms of this process's sending:
        what the provider does in that time one call after another (GroupSizer), or what the
        process sends in that time with its calls side by side, whichever is more. The window
        and the tokens may grant fewer."""
        size = self.sizer.size()
        if self.sizer.fixed is not None or not self.provider.blocking:
            return size
        side_by_side = self._rows_per_second(entry) * self.settings.group_ms / 1000
        if math.isfinite(side_by_side):
            size = max(size, min(self.settings.batch_size, math.floor(side_by_side)))
        return size

    def _claim_size(self, entry: claims.Active) -> int:
        """Rows per claim: about a second of what this process can send (see claims)."""
        rows_per_second = self._rows_per_second(entry)
        size = claims.claim_size(rows_per_second, self.settings.concurrency,
                                 self.settings.lease, self.settings.batch_size)
        if math.isfinite(rows_per_second):
            return size
        return claims.ramped(entry, size, self.settings.concurrency, self.settings.batch_size)

    def _track(self, token: uuid.UUID, groups: set[asyncio.Task[None]]) -> None:
        """Forget the claim token once every group of its claim is recorded."""
        left = {t for t in groups if not t.done()}
        if not left:
            self.tokens_in_hand.pop(token, None)
            return
        self._groups |= left

        def done(task: asyncio.Task[None]) -> None:
            left.discard(task)
            self._groups.discard(task)
            if not left:
                self.tokens_in_hand.pop(token, None)

        for task in left:
            task.add_done_callback(done)

    async def _claim_and_work(self, bid: uuid.UUID, token: uuid.UUID,
                              groups: set[asyncio.Task[None]]) -> None:
        entry = self.picker.active.get(bid) or claims.Active(0, None)
        limit = self._claim_size(entry)
        if self._direct(entry, limit):
            await self._claim_handoff_and_send(bid, entry, token, limit, groups)
            return
        rows = await self._claim(bid, entry, token, limit)
        if not rows:
            await self._drained(bid)
            return
        epoch = rows.first("epoch")
        ids = rows.column("contact_id")
        attempts = dict(zip(ids, rows.column("attempts"), strict=True))
        content = await self.picker.content(bid)
        await self._work_groups(bid, entry, epoch, token, ids, attempts, content, groups)

    async def _claim(self, bid: uuid.UUID, entry: claims.Active, token: uuid.UUID, limit: int,
                     query: str = "claim", contact: bool = True) -> pg.Rows:
        """A claim, charged to the broadcast's stride when it starts (loops picking at once
        spread out) and corrected by what it got."""
        self.picker.claimed(bid, limit)
        rows = await self.claims.claim(bid, entry, token, limit, query, contact)
        self.picker.claimed(bid, len(rows) - limit)
        return rows

    async def _drained(self, bid: uuid.UUID) -> None:
        """Nothing claimable: skip the broadcast until the next look, maybe finalize it."""
        entry = self.picker.active.get(bid)
        if entry is not None:
            entry.empty = True
        rows = await self.db.q("finalize", {"id": bid})
        if rows and rows[0][0]:
            await self._log_finished(bid)
        if rows and not rows[0][0] and entry is not None:
            # not finished, nothing in flight or requeued, yet never-claimed rows are left
            # (a claim whose commit a server crash lost): look for them from the start again
            entry.floor = entry.cursor = 0

    async def _log_finished(self, bid: uuid.UUID) -> None:
        counts = await self.db.q("broadcast_counts", {"id": bid})
        if counts:
            log.info("broadcast %s finished %s: total %s, sent %s, failed %s, skipped %s, "
                     "unknown %s, cancelled %s", bid, *counts[0])

    def _direct(self, entry: claims.Active, limit: int) -> bool:
        """Claim and hand off in one statement? When the whole claim is one group (a provider
        fast enough, or a fixed group size that big), and no rate limit wants tokens before
        the handoff: one statement and one row version fewer per recipient. Not for a blocking
        provider with auto groups: its calls go through the in-flight window."""
        return (not entry.rate_limit and self.state.rates.get("global") == 0
                and self.sizer.size() >= limit
                and (not self.provider.blocking or self.sizer.fixed is not None))

    async def _claim_handoff_and_send(self, bid: uuid.UUID, entry: claims.Active,
                                      token: uuid.UUID, limit: int,
                                      groups: set[asyncio.Task[None]]) -> None:
        """One statement claims a batch and hands it off; then the provider and the record."""
        # before the handoff: nothing may fail between it and the provider call
        content = await self.picker.content(bid)
        try:
            rows = await self._claim(bid, entry, token, limit, "claim_handoff",
                                     _reads_contact(content))
        except pg.UNREACHABLE:
            # did it commit? Either way the provider was never called: put back what it took
            await self.db.q_retry("unhandoff", {"id": bid, "token": token, "ids": None})
            raise
        if not rows:
            await self._drained(bid)
            return
        epoch = rows.first("epoch")
        # the rate the statement read after its fence: a limit set while it waited reaches
        # the groups below before the listener's notification does
        self.state.rates["global"] = float(rows.first("global_rate"))
        ids = rows.column("contact_id")
        attempts = dict(zip(ids, rows.column("attempts"), strict=True))
        flags = rows.column("handed")
        recipients = map(dispatch.Recipient, ids, rows.column("email"), rows.column("name"),
                         rows.column("attributes"), rows.column("tags"))
        every = all(flags)
        handed = list(recipients) if every else [
            r for r, h in zip(recipients, flags, strict=True) if h]
        # contacts that unsubscribed since the snapshot were only claimed: the handoff skips
        # them (under the broadcast row lock), and whatever it cannot is released
        claimed = [] if every else [cid for cid, h in zip(ids, flags, strict=True) if not h]
        try:
            if handed:
                self.stats.groups += 1
                now = time.monotonic()
                await self._send_and_record(bid, epoch, token, handed, attempts, content, 0,
                                            now, now)
        finally:
            if claimed:
                await self._work_groups(bid, entry, epoch, token, claimed, attempts, content,
                                        groups)

    async def _work_groups(self, bid: uuid.UUID, entry: claims.Active, epoch: int,
                           token: uuid.UUID, remaining: list[int], attempts: dict[int, int],
                           content: render.Content | str,
                           in_flight: set[asyncio.Task[None]]) -> None:
        """Hand off claimed rows group by group, each group's calls running while the next
        is handed off, and release what is left. The groups still in flight are left in
        `in_flight`; a fixed group size keeps one group at a time and waits for it."""
        try:
            try:
                while remaining and not self.stopping.is_set():
                    if self.state.is_halted(bid, epoch):
                        break
                    if self.sizer.fixed is not None and in_flight:
                        await asyncio.wait(in_flight)  # the most a crash leaves: one group
                    want = min(self._group_size(entry), len(remaining))
                    held_since = time.monotonic()
                    # tokens and as many window slots, held from here to the group's record
                    granted, wire = await self.buckets.grant(bid, epoch, entry.rate_limit, want,
                                                             self._slots, self._unslot)
                    if granted == 0 or self.stopping.is_set() or self.state.is_halted(bid, epoch):
                        self._unslot(granted)
                        break
                    group = remaining[:granted]
                    try:
                        handed = await self._handoff(bid, epoch, token, group,
                                                     _reads_contact(content))
                    except BaseException:
                        self._unslot(granted)
                        raise
                    remaining = remaining[granted:]
                    self.stats.groups += 1
                    self._unslot(granted - len(handed or []))
                    if handed is None:
                        break  # fenced: cancelled, paused or resumed since the claim
                    if handed:
                        in_flight.add(asyncio.create_task(self._send_and_record(
                            bid, epoch, token, handed, attempts, content, len(handed),
                            held_since, time.monotonic(), wire)))
            finally:
                if remaining:
                    await self.db.q_retry("release", {"id": bid, "token": token,
                                                      "ids": remaining})
        finally:
            if in_flight and self.sizer.fixed is not None:
                await asyncio.gather(*in_flight)

    async def _slots(self, want: int) -> int:
        """Window slots for a group of a blocking provider (others send on the event loop)."""
        if not self.provider.blocking:
            return want
        return await self.window.acquire(want, self.buckets.global_rate())

    def _unslot(self, n: int) -> None:
        if self.provider.blocking:
            self.window.release(n)

    async def _handoff(self, bid: uuid.UUID, epoch: int, token: uuid.UUID,
                       group: list[int], contact: bool = True) -> Handed | None:
        """The fence for one group: the rows handed off ([] all skipped), None when fenced;
        the contacts' attributes and tags only with `contact`."""
        try:
            rows = await self.db.dicts("handoff", {"id": bid, "epoch": epoch, "token": token,
                                                   "ids": group, "contact": contact})
        except pg.UNREACHABLE:
            # did the handoff commit? Either way the provider was never called: undo it
            await self.db.q_retry("unhandoff", {"id": bid, "token": token, "ids": group})
            await self.db.q_retry("release", {"id": bid, "token": token, "ids": group})
            raise
        if rows:
            return [dispatch.recipient(r) for r in rows]
        # all skipped, or fenced (cancelled / paused / resumed since the claim)
        still_ours = await self.db.q("broadcast_fence", {"id": bid, "epoch": epoch})
        return [] if still_ours else None

    async def _send_and_record(self, bid: uuid.UUID, epoch: int, token: uuid.UUID,
                               handed: Handed, attempts: dict[int, int],
                               content: render.Content | str, slots: int,
                               held_since: float, handed_at: float,
                               wire: ratelimit.Slots | None = None) -> None:
        """Rows already handed off: the provider, then the record (slots released after).
        Through the window (slots), each call is recorded as it is answered and frees its own
        slot then; the group's task ends when its last call is recorded. `wire`: the calls'
        slots in the global schedule (the tokens' take booked them)."""
        if slots and self.provider.blocking:
            group = self.recorder.group((bid, epoch, token), slots, held_since)
            await self.sender.send_group(content, handed, attempts, handed_at, group.answered,
                                         wire)
            await group.done
            return
        try:
            outcomes = await self.sender.send_group(content, handed, attempts, handed_at,
                                                    slots=wire)
            self._observe(outcomes)
            await self._record(bid, epoch, token, outcomes)
        except Exception:  # noqa: BLE001 - a record that cannot be written must not stop us
            # its rows stay `sending`: the sweeper makes them unknown (each was attempted)
            log.exception("broadcast %s: a group's outcome could not be recorded", bid)
        finally:
            if slots:
                # Little's law counts the whole time a slot is held (tokens, handoff, call,
                # record), not only the call: at 20 ms calls the statements are most of it
                self.window.observe(time.monotonic() - held_since)
            self._unslot(slots)

    async def _record_batch(self, key: recorder.Key, outcomes: list[dispatch.Outcome]) -> None:
        """What the recorder collected of one claim; its rows stay `sending` if it fails."""
        bid, epoch, token = key
        try:
            self._observe(outcomes)
            await self._record(bid, epoch, token, outcomes)
        except Exception:  # noqa: BLE001 - a record that cannot be written must not stop us
            log.exception("broadcast %s: outcomes could not be recorded", bid)

    def _observe(self, outcomes: list[dispatch.Outcome]) -> None:
        calls = [o.seconds for o in outcomes if o.seconds is not None]
        self.sizer.observe(sum(calls), len(calls))

    async def _record(self, bid: uuid.UUID, epoch: int, token: uuid.UUID,
                      outcomes: list[dispatch.Outcome]) -> None:
        result = await self.db.q_retry("record", dispatch.record_params(
            bid, token, outcomes, self.settings.breaker))
        tripped = bool(result and result[0][1])
        kinds = collections.Counter([o.outcome for o in outcomes])
        sent = kinds["sent"]
        self.stats.failed += kinds["failed"]
        self.stats.retried += kinds["retry"] + kinds["throttled"]
        self.stats.sent += sent
        blocked = None if sent == len(outcomes) else next(
            (o for o in outcomes if o.pause_reason), None)
        if kinds["throttled"]:
            self.window.throttled()
            await self.db.q_retry("drain_tokens", {"name": "global",
                                                   "seconds": self.settings.throttle_backoff})
        else:
            self.window.succeeded(sent)
        if blocked is not None:
            await self._pause(bid, epoch, blocked.pause_reason or "account",
                              {"error": blocked.error})
        elif tripped:
            await self._pause(bid, epoch, "error_rate", {"threshold": self.settings.breaker})

    async def _pause(self, bid: uuid.UUID, epoch: int, reason: str,
                     details: dict[str, Any]) -> None:
        log.warning("pausing broadcast %s: %s", bid, reason)
        # halted first: the loop handing off this claim's next group stops at once
        self.state.halted[bid] = max(self.state.halted.get(bid, 0), epoch)
        await self.db.q_retry("broadcast_pause", {"account": None, "id": bid, "reason": reason,
                                                  "details": json.dumps(details)})


def _reads_contact(content: render.Content | str) -> bool:
    """Whether the claim must bring the contacts' attributes and tags (a template reads
    `contact`); a content that cannot be built reads nothing."""
    return not isinstance(content, str) and content.reads_contact()
