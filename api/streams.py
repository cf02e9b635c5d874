"""Caps on open SSE streams in one API process: per account, and over every account.

An open stream is a connection and a task to uvicorn, which answers 503 to everything once
`limit_concurrency` is reached; so streams are capped below it (config.Settings.total_streams)
and one account cannot take them all (PGCAST_API_MAX_STREAMS). Beyond a cap: 429.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from starlette.requests import HTTPConnection
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pgcast.api import context, errors

RETRY_AFTER = 5  # seconds a refused client should wait before it tries again


@dataclass
class Slot:
    """One open stream of one account; `release` gives it back (once)."""

    counts: collections.Counter[str]
    account: str
    held: bool = True

    def release(self) -> None:
        """Give the slot back; a second call does nothing."""
        if self.held:
            self.held = False
            self.counts[self.account] -= 1
            if self.counts[self.account] <= 0:
                del self.counts[self.account]


def _counts(conn: HTTPConnection) -> collections.Counter[str]:
    state = conn.app.state
    if not hasattr(state, "streams"):
        state.streams = collections.Counter()
    counts: collections.Counter[str] = state.streams
    return counts


def open_streams(conn: HTTPConnection) -> int:
    """Streams open in this process, over every account."""
    return sum(_counts(conn).values())


def take(conn: HTTPConnection, account: str) -> Slot:
    """A slot for a new stream of `account`; raises TooManyStreams beyond either cap."""
    s = context.settings(conn)
    counts = _counts(conn)
    if counts[account] >= s.max_streams:
        raise errors.TooManyStreams(
            f"this account has {s.max_streams} progress streams open on this server; "
            "close one or retry later", headers={"Retry-After": str(RETRY_AFTER)})
    if sum(counts.values()) >= s.total_streams:
        raise errors.TooManyStreams(
            "this server has as many progress streams open as it serves; retry later",
            headers={"Retry-After": str(RETRY_AFTER)})
    counts[account] += 1
    return Slot(counts, account)


class Stream(StreamingResponse):
    """A streaming response that gives its slot back however it ends (done, disconnect, error)."""

    def __init__(self, slot: Slot, content: Any, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the stream, then release the slot."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
