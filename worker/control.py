"""LISTEN for control events (cancel, pause, resume, send, rate, message) on a dedicated
connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid

import psycopg

from pgcast.sql import db
from pgcast.worker import engine

log = logging.getLogger("pgcast.control")

CHANNEL = "pgcast_control"


def apply(state: engine.State, payload: str) -> None:
    """Fold one notification into the shared state; a malformed one is logged and ignored."""
    # Anyone may NOTIFY this channel (a DBA, another version of pgcast): an event that
    # does not parse must never raise here, or it would end the listener for good and
    # every later cancel, pause and rate change would wait for the poll.
    try:
        event = json.loads(payload)
        kind = event["event"]
        if kind == "message":  # pgcast_send_message committed one: the message loop looks
            state.messages.set()
            return
        if kind == "rate":
            rate = float(event["rate"])
            if rate >= 0:  # NaN fails this too
                state.rates[str(event["bucket"])] = rate
            return
        bid = uuid.UUID(str(event["broadcast"]))
        if kind == "cancel":
            state.halted[bid] = engine.NEVER
        elif kind == "pause":
            state.halted[bid] = max(state.halted.get(bid, 0), int(event["epoch"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("ignoring malformed control event %r", payload)
        return
    state.wake.set()  # send, resume, and the others: look at the active list again


async def listen(url: str, state: engine.State, stopping: asyncio.Event) -> None:
    """Keep a LISTEN connection up (reconnecting with backoff) until stopping is set."""
    delay = 0.2
    while not stopping.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(
                    url, autocommit=True, **db.CONNECT_KWARGS) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                delay = 0.2
                # a notification lost while we were away: look at everything again
                state.wake.set()
                state.messages.set()
                while not stopping.is_set():
                    async for note in conn.notifies(timeout=1.0):
                        apply(state, note.payload)
        except psycopg.Error as exc:  # lost connection, server restart, broken socket
            log.warning("control listener lost postgres (%s); reconnecting in %.1fs", exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=delay)
            delay = min(5.0, delay * 2)
