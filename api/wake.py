"""Wake the workers' message loops after a commit, one NOTIFY for many commits.

A transaction that NOTIFYs takes a database-wide lock at commit and holds it through its commit's
WAL flush, so sign-ups that each NOTIFYd committed one at a time (bench.signup: 4-7 sessions
waiting on Lock:object at 200 sign-ups/s). A sign-up now queues its confirmation without one
(pgcast_signup_v2), as POST /messages does (pgcast_send_message_v3 with p_notify false), and
each asks this process's Waker for a wake-up after its commit. The Waker runs
at most one wake_messages statement at a time, and at most one every SPACING seconds: a request
made while one runs is served by the next, which starts after the request, so every commit is
followed by a NOTIFY that starts after it. A wake-up that fails (database gone, pool empty) is
logged; the loops' poll finds the message.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import psycopg
import psycopg_pool

from pgcast.api import db

log = logging.getLogger("pgcast.api.wake")

SPACING = 0.02  # seconds between two wake-ups' starts: at most 50 NOTIFYs a second


class Waker:
    """One process's coalesced wake-ups of the message loops."""

    def __init__(self, pool: db.Pool, spacing: float = SPACING) -> None:
        self.pool = pool
        self.spacing = spacing
        self.task: asyncio.Task[None] | None = None
        self.again = False  # asked for while the task ran: one more wake-up
        self.last = -math.inf  # monotonic start of the last wake-up
        self.sent = 0  # wake-ups sent (the bench and the tests read it)

    def request(self) -> None:
        """A commit queued messages: a NOTIFY that starts after now will follow."""
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name="wake-messages")
        else:
            self.again = True

    async def _run(self) -> None:
        while True:
            self.again = False
            delay = self.last + self.spacing - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.last = time.monotonic()
            try:
                await db.one(self.pool, "wake_messages", {})
                self.sent += 1
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                log.warning("could not wake the message loops (%s); their poll will", exc)
            if not self.again:
                return

    async def close(self) -> None:
        """Wait for the wake-up under way (at shutdown, before the pool closes)."""
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
