"""A local SES-compatible HTTP endpoint with a configurable latency, for benchmarks and tests.

It answers sesv2 SendEmail (POST /v2/email/outbound-emails) with `{"MessageId": ...}` after
`latency` seconds (a share `slow_share` of requests, drawn from a seeded generator, after
`slow_latency` seconds instead: a latency tail), and records when each request arrived and for
whom: rates are measured here, where the provider receives the requests. asyncio, HTTP/1.1
keep-alive, loopback only.
Requests whose body contains one of `no_id_for` are answered 200 with no MessageId (an
answer botocore accepts and pgcast cannot read: the request did reach the provider).
SendBulkEmail (POST /v2/email/outbound-bulk-emails) is answered the same way, entry by entry
(one BulkEmailEntryResults entry per BulkEmailEntry, SUCCESS and a message id; an entry
holding one of `no_id_for`: SUCCESS with no MessageId), after the same latency; each entry
counts as a request received and in flight (rates are of messages, as they are at SES).
`bulk=False` answers it 404, as an endpoint without the operation does.

    python -m bench.sesd --latency-ms 100 --port 8025
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

SEND_EMAIL_PATH = "/v2/email/outbound-emails"
SEND_BULK_PATH = "/v2/email/outbound-bulk-emails"
MAX_BODY = 4 * 1024 * 1024  # bytes


async def read_request(reader: asyncio.StreamReader,
                       max_body: int | None = None) -> tuple[str, str, bytes] | None:
    """One HTTP/1.1 request off a kept-alive connection: (method, path, body); None at the end
    of the stream or for a body over `max_body` bytes."""
    line = await reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    length = 0
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if max_body is not None and length > max_body:
        return None
    return method, path, (await reader.readexactly(length) if length else b"")


@dataclass
class Received:
    """One SendEmail request as the endpoint saw it."""

    at: float  # time.monotonic() when its body had arrived
    to: str  # the address part of the first ToAddresses entry


@dataclass
class Endpoint:
    """The endpoint's settings and what it received (read it from any thread)."""

    latency: float = 0.1  # seconds before each answer
    slow_share: float = 0.0  # share of requests answered after slow_latency instead
    slow_latency: float = 0.0  # seconds
    no_id_for: list[str] = field(default_factory=list)
    bulk: bool = True  # False: SendBulkEmail answered 404 (not served)
    received: list[Received] = field(default_factory=list)
    bulk_calls: int = 0  # SendBulkEmail requests answered
    bulk_entries: int = 0  # their entries
    in_flight: int = 0  # requests being answered right now
    most_in_flight: int = 0  # the highest in_flight seen
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _open: dict[asyncio.Task[Any], asyncio.StreamWriter] = field(default_factory=dict)
    _random: random.Random = field(default_factory=lambda: random.Random(25))

    def reset(self) -> None:
        """Forget what was received."""
        with self._lock:
            self.received = []
            self.most_in_flight = self.in_flight

    def snapshot(self) -> list[Received]:
        """A copy of what was received so far."""
        with self._lock:
            return list(self.received)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = writer
        try:
            while True:
                request = await read_request(reader, MAX_BODY)
                if request is None:
                    return
                method, path, body = request
                route = path.split("?")[0]
                answer: dict[str, Any]
                if method == "POST" and route == SEND_EMAIL_PATH:
                    status, answer = await self._send_email(body)
                elif method == "POST" and route == SEND_BULK_PATH and self.bulk:
                    status, answer = await self._send_bulk(body)
                else:
                    status, answer = 404, {"message": f"not served here: {method} {path}"}
                data = json.dumps(answer).encode()
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                             f"x-amzn-RequestId: {uuid.uuid4()}\r\n"
                             f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._open.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _send_email(self, body: bytes) -> tuple[int, dict[str, str]]:
        request = json.loads(body)
        to = str(request.get("Destination", {}).get("ToAddresses", [""])[0])
        address = to.rsplit("<", 1)[-1].rstrip(">")
        with self._lock:
            self.received.append(Received(time.monotonic(), address))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            slow = self.slow_share > 0 and self._random.random() < self.slow_share
            await asyncio.sleep(self.slow_latency if slow else self.latency)
        finally:
            with self._lock:
                self.in_flight -= 1
        text = body.decode("utf-8", "replace")
        if any(marker in text for marker in self.no_id_for):
            return 200, {}
        return 200, {"MessageId": f"sesd-{uuid.uuid4()}"}

    async def _send_bulk(self, body: bytes) -> tuple[int, dict[str, Any]]:
        entries = json.loads(body).get("BulkEmailEntries", [])
        now = time.monotonic()
        with self._lock:
            self.bulk_calls += 1
            self.bulk_entries += len(entries)
            for e in entries:
                to = str(e.get("Destination", {}).get("ToAddresses", [""])[0])
                self.received.append(Received(now, to.rsplit("<", 1)[-1].rstrip(">")))
            self.in_flight += len(entries)
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            slow = self.slow_share > 0 and self._random.random() < self.slow_share
            await asyncio.sleep(self.slow_latency if slow else self.latency)
        finally:
            with self._lock:
                self.in_flight -= len(entries)
        results: list[dict[str, str]] = []
        for e in entries:
            text = json.dumps(e)
            if any(marker in text for marker in self.no_id_for):
                results.append({"Status": "SUCCESS"})
            else:
                results.append({"Status": "SUCCESS", "MessageId": f"sesd-{uuid.uuid4()}"})
        return 200, {"BulkEmailEntryResults": results}

    async def serve(self, port: int = 0, ready: threading.Event | None = None) -> None:
        """Serve until cancelled."""
        server = await asyncio.start_server(self._handle, "127.0.0.1", port, backlog=1024)
        self.port = int(server.sockets[0].getsockname()[1])
        if ready is not None:
            ready.set()
        try:
            await server.serve_forever()
        finally:
            # close every connection (a worker still running keeps its own open)
            server.close()
            handlers = list(self._open)
            for writer in list(self._open.values()):
                writer.close()  # its handler reads EOF (or fails a write) and returns
            if handlers:
                await asyncio.wait(handlers, timeout=max(5.0, 2 * self.latency))
            await server.wait_closed()

    def env(self) -> dict[str, str]:
        """What boto3 in a worker needs to send here."""
        url = f"http://127.0.0.1:{self.port}"
        return {"AWS_ENDPOINT_URL_SESV2": url, "AWS_ENDPOINT_URL_SES": url,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                "PGCAST_PROVIDER": "ses",
                # a ses worker builds one-click unsubscribe links (mail.unsubscribe)
                "PGCAST_PUBLIC_URL": "https://pgcast.example",
                "PGCAST_UNSUBSCRIBE_SECRET": "bench-unsubscribe-secret-of-at-least-32-bytes"}


@contextlib.contextmanager
def running(latency: float, no_id_for: list[str] | None = None,  # type: ignore[no-untyped-def]
            slow_share: float = 0.0, slow_latency: float = 0.0, bulk: bool = True):
    """An Endpoint served from a daemon thread with its own event loop, for the block."""
    endpoint = Endpoint(latency=latency, no_id_for=list(no_id_for or []),
                        slow_share=slow_share, slow_latency=slow_latency, bulk=bulk)
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    task: list[asyncio.Task[None]] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        task.append(loop.create_task(endpoint.serve(0, ready)))
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task[0])

    thread = threading.Thread(target=run, daemon=True, name="sesd")
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the SES endpoint did not start")
    try:
        yield endpoint
    finally:
        loop.call_soon_threadsafe(task[0].cancel)
        thread.join(10)
        loop.close()


def main() -> None:
    """Serve in the foreground."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--slow-share", type=float, default=0.0)
    parser.add_argument("--slow-ms", type=float, default=0.0)
    parser.add_argument("--no-bulk", action="store_true",
                        help="answer SendBulkEmail 404, as an endpoint without it does")
    args = parser.parse_args()
    endpoint = Endpoint(latency=args.latency_ms / 1000, slow_share=args.slow_share,
                        slow_latency=args.slow_ms / 1000, bulk=not args.no_bulk)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(endpoint.serve(args.port))


if __name__ == "__main__":
    main()
