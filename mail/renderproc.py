"""A render process: renders what mail.renderpool sends it, under hard limits of its own.

It runs one render at a time on its main thread, each under mail.sandbox's budget; the
process itself has an address-space limit (RLIMIT_AS), so whatever the sandbox missed
fails with MemoryError here instead of growing the worker or the API; and the pool kills it
when a render does not answer in time (a step the sandbox cannot interrupt).

Jobs (pickled over a pipe): `(kind, spec, items, stop_after)`; the answer is one result per
item, sent in chunks as they are made (so the pool can time each one):
    messages: items are recipients; a result is a Message, or Failure.
    skeleton: an item is a stand-in token; a result is a message.Skeleton, or Failure.
    preview: items are contact rows (or None); a result is mail.preview's dict, or Failure.
    trial: spec is (subject, from, text, html); a result is None or Failure.
"""

from __future__ import annotations

import collections
import mmap
import resource
import struct
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from pgcast.mail import errors, message, preview, transactional

CACHE = 32  # compiled broadcasts kept per process
FLUSH = 0.02  # seconds: results waiting at most this long before they are sent
CHUNK = 64  # results sent at once at most
BOARD = 8  # bytes of the board: the index of the item being rendered (a signed 64-bit int)


@dataclass(frozen=True)
class Spec:
    """What a Content is built from: message.Content's arguments."""

    key: str  # names this content in the process's cache (a new key: compiled again)
    account: str  # whose share of the pool renders it
    kwargs: dict[str, Any]


def spec_of(content: message.Content) -> Spec:
    """The spec a render process rebuilds `content` from (the same key: compiled once)."""
    return Spec(content.key, content.account, {
        "broadcast_id": content.broadcast_id, "account": content.account,
        "subject": content.subject_source, "from_address": content.from_source,
        "text": content.text_source, "html": content.html_source, "keys": content.keys,
        "base_url": content.base_url, "test": content.test, "inert": content.inert,
        "track": content.track, "links": content.links})


@dataclass(frozen=True)
class Failure:
    """A render that failed: its reason, and the budget it went over (None: another fault)."""

    reason: str
    budget: str | None = None
    skipped: bool = False  # not rendered: the stop_after budget failures in a row came first


def failure(exc: BaseException) -> Failure:
    """The Failure of an exception raised by a render."""
    if isinstance(exc, errors.RenderBudget):
        return Failure(str(exc), exc.budget)
    if isinstance(exc, MemoryError):
        return Failure("render budget exceeded (memory): the render process ran out of memory",
                       "memory")
    if isinstance(exc, errors.MailError):
        return Failure(str(exc))
    return Failure(f"{type(exc).__name__}: {exc}"[:500])


class Worker:
    """The process's loop: compiled contents cached by key, results sent in chunks."""

    def __init__(self, conn: Connection, timeout_ms: int,
                 board: mmap.mmap | None = None) -> None:
        self.conn = conn
        self.board = board  # where the pool reads which item a kill stopped
        self.timeout_ms = timeout_ms
        self.cache: collections.OrderedDict[str, message.Content] = collections.OrderedDict()

    def content(self, spec: Spec) -> message.Content:
        """The compiled content of a spec (compiled once per key)."""
        found = self.cache.get(spec.key)
        if found is not None:
            self.cache.move_to_end(spec.key)
            return found
        made = message.Content(**spec.kwargs, timeout_ms=self.timeout_ms)
        self.cache[spec.key] = made
        if len(self.cache) > CACHE:
            self.cache.popitem(last=False)
        return made

    def one(self, kind: str, spec: Any, item: Any) -> Any:
        """One item's result (raises what the render raises)."""
        if kind == "messages":
            contact_id, email, name, attributes, tags, deliver_to = item
            return self.content(spec).render(contact_id, email, name, attributes, tags,
                                             deliver_to)
        if kind == "skeleton":  # item: the stand-in token (message.Content.skeleton)
            return self.content(spec).skeleton(item)
        if kind == "preview":
            return preview.of(self.content(spec), item)
        if kind == "trial":
            preview.trial(*spec, timeout_ms=self.timeout_ms)
            return None
        if kind == "message":  # a transactional message's template: spec (subject, text, html)
            subject, text, html = spec
            return transactional.render_template(subject, text, html, item, self.timeout_ms)
        raise ValueError(f"unknown job {kind!r}")

    def run(self, kind: str, spec: Any, items: list[Any], stop_after: int) -> None:
        """Answer one job: a result per item, in chunks."""
        chunk: list[Any] = []
        sent_at = time.monotonic()
        in_a_row = 0
        for index, item in enumerate(items):
            if self.board is not None:  # before the item: a kill now blames this one only
                struct.pack_into("q", self.board, 0, index)
            if stop_after and in_a_row >= stop_after:
                result: Any = Failure("not rendered: the render budget was exceeded "
                                      f"{in_a_row} times in a row", "render_budget", True)
            else:
                try:
                    result = self.one(kind, spec, item)
                    in_a_row = 0
                except Exception as exc:  # noqa: BLE001 - every fault is this item's result
                    result = failure(exc)
                    in_a_row = in_a_row + 1 if result.budget else 0
            chunk.append(result)
            if len(chunk) >= CHUNK or time.monotonic() - sent_at > FLUSH:
                self.conn.send(chunk)
                chunk, sent_at = [], time.monotonic()
        if chunk:
            self.conn.send(chunk)


def serve(conn: Connection, timeout_ms: int, memory_bytes: int, board_fd: int = -1) -> None:
    """The process's entry point: limit it, say ready, answer jobs until the pipe closes."""
    board = mmap.mmap(board_fd, BOARD) if board_fd >= 0 else None
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    worker = Worker(conn, timeout_ms, board)
    conn.send("ready")
    while True:
        try:
            kind, spec, items, stop_after = conn.recv()
        except (EOFError, OSError):
            return
        worker.run(kind, spec, items, stop_after)


if __name__ == "__main__":  # python -m mail.renderproc FD TIMEOUT_MS MEMORY_BYTES [BOARD_FD]
    # through the module's own name: what it pickles must unpickle as mail.renderproc.*
    from pgcast.mail import renderproc

    renderproc.serve(Connection(int(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]),
                     int(sys.argv[4]) if len(sys.argv) > 4 else -1)
