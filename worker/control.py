"""LISTEN for control events (cancel, pause, resume, send, rate) on a dedicated connection."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import psycopg

from worker import engine

log = logging.getLogger("pgcast.control")

CHANNEL = "pgcast_control"


def apply(state: engine.State, payload: str) -> None:
    """Fold one notification into the shared state."""
    try:
        event = json.loads(payload)
        kind = event["event"]
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring malformed control event %r", payload)
        return
    if kind == "rate":
        state.rates[str(event["bucket"])] = float(event["rate"])
        return
    bid = uuid.UUID(event["broadcast"])
    if kind == "cancel":
        state.halted[bid] = engine.NEVER
    elif kind == "pause":
        state.halted[bid] = max(state.halted.get(bid, 0), int(event["epoch"]))
    state.wake.set()  # send, resume, and the others: look at the active list again


async def listen(url: str, state: engine.State, stopping: asyncio.Event) -> None:
    """Keep a LISTEN connection up (reconnecting with backoff) until stopping is set."""
    delay = 0.2
    while not stopping.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                delay = 0.2
                # a notification lost while we were away: look at everything again
                state.wake.set()
                while not stopping.is_set():
                    async for note in conn.notifies(timeout=1.0):
                        apply(state, note.payload)
        except psycopg.OperationalError as exc:
            log.warning("control listener lost postgres (%s); reconnecting in %.1fs", exc, delay)
            try:
                await asyncio.wait_for(stopping.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(5.0, delay * 2)
