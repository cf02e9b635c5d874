"""The SES client's HTTP connections: opened a few at a time, kept warm, retired before a load
balancer's idle timeout, and counted, so that a failure can say whether any byte of its
request was written.

botocore keeps a urllib3 pool of up to `max_pool_connections` connections and opens a new
one whenever every pooled one is busy: a worker whose window opens 128 calls at once opened
128 connections at once, and an endpoint or proxy that cannot accept them that fast (the
standard library's listen backlog is 5) reset them after the request was written: `unknown`
rows that never reached SES (issue 25). Here every new connection passes a gate (GCRA: one
every 1 / CONNECT_RATE seconds, CONNECT_BURST at once), a pooled connection idle longer than
IDLE_RETIRE is closed rather than reused (the far side may be closing it right now), and the
bytes each call writes are counted on its thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import botocore.awsrequest

log = logging.getLogger("pgcast.worker")

CONNECT_RATE = 100.0  # new connections per second, per process (128 take about 1.3 s)
CONNECT_BURST = 2  # new connections at once: below the stdlib's listen backlog of 5, x 2 hosts
IDLE_RETIRE = 45.0  # seconds: below the 60 s idle timeout of AWS's and most load balancers


@dataclass
class Connections:
    """One client's connection gate and counts (thread-safe)."""

    rate: float = CONNECT_RATE
    burst: int = CONNECT_BURST
    idle_retire: float = IDLE_RETIRE
    opened: int = 0  # TCP connections opened (attempted)
    waited: int = 0  # calls that waited at the gate
    retired_idle: int = 0  # closed after IDLE_RETIRE unused, before any reuse
    failed_before_write: int = 0  # calls that failed with no byte written: retried
    unknown_after_write: int = 0  # calls that failed after writing: outcome unknown
    tracking: bool = False  # install() succeeded: bytes written are counted
    connected: int = 0  # connections open right now
    pace: Callable[[], object] | None = None  # the rate limit's pacer (worker.ratelimit)
    _tat: float = float("-inf")  # GCRA: theoretical arrival time of the next connection
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _local: threading.local = field(default_factory=threading.local)

    def book(self) -> float:
        """Book a new connection; the seconds it must wait before it opens (0: at once)."""
        interval = 1.0 / self.rate
        with self._lock:
            now = time.monotonic()
            go = max(now, self._tat - (self.burst - 1) * interval)
            self._tat = max(go, self._tat) + interval
            if go > now:
                self.waited += 1
        return go - now

    def begin(self) -> None:
        """A call starts on this thread: nothing of its request written yet."""
        self._local.written = 0

    def connecting(self) -> None:
        """A connection is about to open on this thread (its call has passed the pacer): wait
        at the gate, and after a wait pass the pacer again, so that the calls the pacer
        spaced are not bunched by the wait (the slot it had goes unused)."""
        seconds = self.book()
        if seconds > 0:
            time.sleep(seconds)
            if self.pace is not None:
                self.pace()
        with self._lock:
            self.opened += 1

    def up(self, delta: int) -> None:
        """A connection opened (+1) or closed (-1)."""
        with self._lock:
            self.connected = max(0, self.connected + delta)

    def wrote(self, n: int) -> None:
        """n bytes of this thread's request went to the socket."""
        self._local.written = getattr(self._local, "written", 0) + n

    def written(self) -> int:
        """Bytes of this thread's current request written so far (1 when not counted:
        assume the worst)."""
        if not self.tracking:
            return 1
        return int(getattr(self._local, "written", 0))

    def failed(self, before_write: bool) -> None:
        """A call failed with an exception of the transport."""
        with self._lock:
            if before_write:
                self.failed_before_write += 1
            else:
                self.unknown_after_write += 1

    def retired(self) -> None:
        """A pooled connection was retired for idleness."""
        with self._lock:
            self.retired_idle += 1

    def counts(self) -> dict[str, int]:
        """The counts, for the exit line and the metrics."""
        with self._lock:
            return {"opened": self.opened, "waited": self.waited,
                    "retired_idle": self.retired_idle,
                    "failed_before_write": self.failed_before_write,
                    "unknown_after_write": self.unknown_after_write}


class _Tracked:
    """Mixed into botocore's connection classes: the gate, and the bytes written."""

    pgcast: Connections
    sock: Any
    pgcast_idle_since: float = float("inf")

    def connect(self) -> None:
        """Open the TCP connection once the gate admits it."""
        self.pgcast.connecting()
        super().connect()  # type: ignore[misc]
        self.pgcast.up(1)

    def close(self) -> None:
        """Close it (and count it closed)."""
        was_open = self.sock is not None
        super().close()  # type: ignore[misc]
        if was_open:
            self.pgcast.up(-1)

    def send(self, data: Any) -> None:
        """Write to the socket, counting each byte the kernel took."""
        if getattr(self, "_response_received", False):
            super().send(data)  # type: ignore[misc]  # botocore drops it
            return
        if not isinstance(data, (bytes, bytearray, memoryview)):
            self.pgcast.wrote(1)  # a file or iterable: some may be written, count it so
            super().send(data)  # type: ignore[misc]
            return
        if self.sock is None:
            self.connect()  # what http.client's auto_open does
        view = memoryview(data).cast("B")
        while view:
            n = self.sock.send(view)
            self.pgcast.wrote(n)
            view = view[n:]


class _Pool:
    """Mixed into botocore's connection pools: connections idle too long are retired."""

    pgcast: Connections

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        idle = time.monotonic() - getattr(conn, "pgcast_idle_since", float("inf"))
        if conn is not None and getattr(conn, "sock", None) is not None \
                and idle > self.pgcast.idle_retire:
            conn.close()  # the next request reconnects it, through the gate
            self.pgcast.retired()
        return conn

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            conn.pgcast_idle_since = time.monotonic()
        super()._put_conn(conn)  # type: ignore[misc]


def install(client: Any, connections: Connections) -> bool:
    """Route the client's connections through `connections` (False: this botocore keeps its
    pool elsewhere, and connections are opened as botocore does)."""
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    manager = getattr(session, "_manager", None)
    if session is None or manager is None or \
            not isinstance(getattr(session, "_pool_classes_by_scheme", None), dict):
        log.warning("botocore's connection pool is not where pgcast looks: connections are "
                    "opened without the gate")
        return False
    attrs = {"pgcast": connections}
    http_conn = type("PgcastHTTPConnection", (_Tracked, botocore.awsrequest.AWSHTTPConnection),
                     attrs)
    https_conn = type("PgcastHTTPSConnection",
                      (_Tracked, botocore.awsrequest.AWSHTTPSConnection), attrs)
    classes = {
        "http": type("PgcastHTTPPool", (_Pool, botocore.awsrequest.AWSHTTPConnectionPool),
                     {**attrs, "ConnectionCls": http_conn}),
        "https": type("PgcastHTTPSPool", (_Pool, botocore.awsrequest.AWSHTTPSConnectionPool),
                      {**attrs, "ConnectionCls": https_conn}),
    }
    session._pool_classes_by_scheme = classes
    manager.pool_classes_by_scheme = classes
    connections.tracking = True
    return True
