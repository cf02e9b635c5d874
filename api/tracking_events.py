"""Opens and clicks recorded in batches, off the request path, and told human from machine.

A redirect or a pixel never waits on a write: the event goes into this process's buffer
and the answer leaves at once. A background task writes the buffer every FLUSH seconds in
one statement (pgcast_track_v1, committed asynchronously). What a crash of the API process
(or of Postgres) can lose is the last HOLD + FLUSH seconds or so of counts, never a
redirect: the redirect's URL is read from broadcast_links, not from the buffer. A write
that fails is retried with the next batch; beyond MAX_PENDING events the oldest are
dropped (counted in `dropped`, logged). A token is no licence to write rows: beyond REPEATS
events a minute of one message's open (or of one of its links) a process keeps none (counted
in `repeated`, logged).

Machine events (docs/tracking.md): a request from a known pre-fetching proxy or link
scanner (its User-Agent), an event within QUICK seconds of the message's render (just
before its send), and every link of one message (or BURST_LINKS different ones: no person
clicks three links in two seconds) clicked within BURST seconds. The last
needs the message's clicks together: events are held HOLD seconds before they are written,
and a message's links seen together are remembered only in memory, a few seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pgcast.api import db
from pgcast.mail import tracking

log = logging.getLogger("pgcast.api.tracking")

FLUSH = 0.25  # seconds between writes of the buffer
HOLD = 2.0  # seconds an event waits, so a message's burst of clicks is seen together
BURST = 2.0  # seconds: every link of a message clicked within this is a scanner
BURST_LINKS = 3  # different links of one message within BURST: a scanner (or all, if fewer)
QUICK = 10.0  # seconds after the render (the send) within which an event is a machine's
MAX_PENDING = 100_000  # events kept in memory at most (a database down for long)
MAX_BATCH = 5000  # events per statement
# a flood on one token (anyone who got the message holds it): at most REPEATS events a
# REPEAT_WINDOW of one message's open, or of one of its links, are kept by a process; the rest
# are not written (the redirect still answers). The most keys remembered: MAX_REPEAT_KEYS.
REPEATS = 10
REPEAT_WINDOW = 60.0
MAX_REPEAT_KEYS = 100_000
# User-Agents of proxies that fetch every image when a message arrives, and of link
# scanners: Apple Mail Privacy Protection's fetcher (WebKit with no browser token), security
# gateways, headless browsers and HTTP libraries. Gmail's GoogleImageProxy is NOT here: it
# fetches when the message is opened (and caches), so it is a human open (docs/tracking.md).
MACHINE_AGENTS = re.compile(
    r"^Mozilla/5\.0 \([^)]*\) AppleWebKit/[0-9.]+ \(KHTML, like Gecko\)$"
    r"|bot\b|spider|crawl|slurp|preview|scanner|barracuda|mimecast|proofpoint|"
    r"safelinks|headlesschrome|phantomjs|python-|curl/|wget/|go-http-client|okhttp|"
    r"java/|libwww|httpclient|facebookexternalhit|microsoft office existence",
    re.IGNORECASE)


def machine_agent(user_agent: str | None) -> bool:
    """Whether a User-Agent is a known pre-fetching proxy or scanner (no User-Agent: yes)."""
    if not user_agent or not user_agent.strip():
        return True
    return MACHINE_AGENTS.search(user_agent.strip()[:512]) is not None


@dataclass
class Event:
    """One open or click, as the request saw it."""

    broadcast_id: uuid.UUID
    kind: str  # 'open' or 'click'
    link: int | None
    contact_id: int | None
    message: int  # the contact, or the message's random number (never written)
    at: dt.datetime
    machine: bool
    links: int  # the broadcast's tracked links (every one clicked at once: a scanner)
    arrived: float = field(default_factory=time.monotonic)
    source: str = "pgcast"  # or 'ses': an SES Open or Click event


def classify(ref: tracking.Ref, user_agent: str | None, now: float) -> bool:
    """The heuristics one request can decide alone: its User-Agent, and how soon it came."""
    return machine_agent(user_agent) or now - ref.rendered_at < QUICK


class Recorder:
    """This process's buffer of events and the task that writes it."""

    def __init__(self, pool: db.Pool) -> None:
        self.pool = pool
        self.pending: collections.deque[Event] = collections.deque()
        # (broadcast, message) -> (first click's time, links clicked): BURST's memory
        self.bursts: dict[tuple[uuid.UUID, int], tuple[float, set[int]]] = {}
        self.dropped = 0
        # (broadcast, message, kind, link) -> (its window's start, events in it): REPEATS
        self.repeats: collections.OrderedDict[tuple[uuid.UUID, int, str, int | None],
                                              tuple[float, int]] = collections.OrderedDict()
        self.repeated = 0  # events not kept: a token's flood
        self.written = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def add(self, event: Event) -> None:
        """Buffer one event (never waits); a flood on one token is not kept."""
        if self.flooding(event):
            self.repeated += 1
            if self.repeated % 1000 == 1:
                log.warning("tracking: %d repeated events of one token not kept so far",
                            self.repeated)
            return
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("tracking buffer full: %d events dropped so far", self.dropped)
        self.remember(event)
        self.pending.append(event)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def flooding(self, event: Event) -> bool:
        """Whether this event is past REPEATS of its message's open (or link) in the window."""
        key = (event.broadcast_id, event.message, event.kind, event.link)
        found = self.repeats.get(key)
        if found is not None and event.arrived - found[0] < REPEAT_WINDOW:
            if found[1] >= REPEATS:
                return True
            self.repeats[key] = (found[0], found[1] + 1)
        else:
            self.repeats[key] = (event.arrived, 1)
        self.repeats.move_to_end(key)
        while len(self.repeats) > MAX_REPEAT_KEYS:
            self.repeats.popitem(last=False)
        return False

    def remember(self, event: Event) -> None:
        """Note a click's link among its message's clicks of the last BURST seconds."""
        if event.kind == "click" and event.link is not None:
            key = (event.broadcast_id, event.message)
            first, seen = self.bursts.get(key, (event.arrived, set()))
            if event.arrived - first > BURST:
                first, seen = event.arrived, set()
            seen.add(event.link)
            self.bursts[key] = (first, seen)

    def _burst(self, event: Event) -> bool:
        found = self.bursts.get((event.broadcast_id, event.message))
        return (found is not None and event.links >= 2
                and len(found[1]) >= min(event.links, BURST_LINKS)
                and event.arrived - found[0] <= BURST)

    def take(self, everything: bool = False) -> list[Event]:
        """The events due for writing (held HOLD seconds), their burst decided."""
        now = time.monotonic()
        out: list[Event] = []
        while self.pending and len(out) < MAX_BATCH and (
                everything or now - self.pending[0].arrived >= HOLD):
            event = self.pending.popleft()
            if event.kind == "click" and self._burst(event):
                event.machine = True
            out.append(event)
        if out and self.bursts:  # a message's clicks are remembered a few seconds only
            horizon = now - HOLD - BURST
            self.bursts = {k: v for k, v in self.bursts.items() if v[0] > horizon}
        # a token's count is remembered a window after its last event at most (oldest first)
        while self.repeats:
            key, (start, _) = next(iter(self.repeats.items()))
            if start > now - REPEAT_WINDOW:
                break
            del self.repeats[key]
        return out

    async def write(self, events: list[Event]) -> None:
        """One statement for a batch, per source (raises what the database raises)."""
        for source in sorted({e.source for e in events}):
            some = [e for e in events if e.source == source]
            params: dict[str, Any] = {
                "broadcasts": [e.broadcast_id for e in some], "at": [e.at for e in some],
                "kinds": [e.kind for e in some], "links": [e.link for e in some],
                "contacts": [e.contact_id for e in some],
                "machine": [e.machine for e in some], "source": source}
            await db.one(self.pool, "tracking_record", params)
        self.written += len(events)

    async def _run(self) -> None:
        failing = -math.inf
        while not self._stopping:
            await asyncio.sleep(FLUSH)
            batch = self.take()
            if not batch:
                continue
            try:
                await self.write(batch)
            except asyncio.CancelledError:  # cancelled mid-write: the batch is not lost
                self.pending.extendleft(reversed(batch))
                raise
            except Exception as exc:  # noqa: BLE001 - counts only: keep them, try again
                if time.monotonic() - failing > 10:
                    log.warning("tracking events not written yet (%d): %s", len(batch), exc)
                    failing = time.monotonic()
                self.pending.extendleft(reversed(batch))
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        """Write what is buffered (the server is stopping); stop the task."""
        if self._task is not None:
            self._stopping = True  # the task ends after the write in progress, if any
            # past the wait it is cancelled: what it was writing goes back to pending
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, FLUSH + 30)
            self._task = None
            self._stopping = False
        while self.pending:
            batch = self.take(everything=True)
            try:
                await self.write(batch)
            except Exception as exc:  # noqa: BLE001 - stopping: say what is lost
                log.warning("tracking: %d events lost at shutdown: %s",
                            len(batch) + len(self.pending), exc)
                self.pending.clear()
