"""A real local HTTP receiver for webhook tests and benchmarks: records every request, can
fail the first N attempts of each event and answer after a delay."""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    """One request as the receiver saw it."""

    event_id: str
    signature: str
    body: bytes
    path: str
    host: str
    status: int


@dataclass
class Receiver:
    """What the server does and what it got."""

    fail_first: int = 0  # answer 500 to the first N attempts of each event
    delay: float = 0.0  # seconds before answering
    status: int = 200
    requests: list[Received] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    location: str | None = None  # sent with the answer (a redirect, say)
    sni: list[str | None] = field(default_factory=list)  # TLS server names asked for
    scheme: str = "http"

    @property
    def url(self) -> str:
        """The receiver's URL (http, loopback)."""
        return f"{self.scheme}://127.0.0.1:{self.port}/hook"

    def snapshot(self) -> list[Received]:
        """The requests so far."""
        with self.lock:
            return list(self.requests)

    def ids(self) -> list[str]:
        """Pgcast-Event-Id of every request, in arrival order."""
        return [r.event_id for r in self.snapshot()]


def _handler(rx: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            rx.started.set()
            if rx.delay:
                time.sleep(rx.delay)
            event_id = self.headers.get("Pgcast-Event-Id", "")
            with rx.lock:
                seen = sum(1 for r in rx.requests if r.event_id == event_id)
                status = 500 if seen < rx.fail_first else rx.status
                rx.requests.append(Received(event_id, self.headers.get("Pgcast-Signature", ""),
                                            body, self.path, self.headers.get("Host", ""),
                                            status))
            answer = b'{"ok": true}' if status < 300 else b"not yet"
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                if rx.location:
                    self.send_header("Location", rx.location)
                self.end_headers()
                self.wfile.write(answer)
            except (BrokenPipeError, ConnectionResetError):
                # the sender gave up first (a delay past its timeout): what the test wanted
                self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def running(tls: ssl.SSLContext | None = None, **kw: Any) -> Iterator[Receiver]:
    """A receiver on a free loopback port, in a thread, for the block's duration; with `tls`,
    an https one (the server names clients ask for are kept in `sni`)."""
    rx = Receiver(**kw)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(rx))
    if tls is not None:
        rx.scheme = "https"
        tls.sni_callback = lambda _sock, name, _ctx: rx.sni.append(name)  # type: ignore[assignment,misc,return-value]
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    rx.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rx
    finally:
        server.shutdown()
        server.server_close()
