"""One webhook POST, safe from SSRF: the name is resolved, every address it resolves to is
checked, and the connection goes to the checked address (the Host header and TLS SNI carry
the name, and the certificate is verified against the name). No redirect is followed. A name's
addresses are kept for RESOLVE_TTL seconds (a slow resolver is not on every delivery's path)
and checked again at every delivery.

h11 (MIT, the HTTP/1.1 state machine under httpcore) speaks HTTP over an asyncio stream that
this module opens itself, to the checked address: a webhook POST needs no more (no proxy,
cookies, redirects or HTTP/2), and httpx's per-request layers cost about half of a delivery's
CPU (bench/RESULTS.md). One kept-alive connection per endpoint and (name, address, port): a
TLS connection verified for one name is never reused for another, and endpoints never queue
behind each other for a connection (an endpoint has one delivery in flight at a time).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass

import certifi
import h11

from pgcast.sql import errors as sql_errors
from pgcast.sql import hooks

RESPONSE_KEPT = 1024  # bytes of the receiver's answer kept in the delivery log
DRAIN_MAX = 64 * 1024  # bytes of an answer read to keep its connection; a longer one closes it
CONNECTIONS_KEPT = 256  # idle keep-alive connections kept (one per endpoint and address)
READ_SIZE = 16 * 1024  # bytes asked of the socket at a time
RESOLVE_TTL = 30.0  # seconds a name's resolved addresses are reused (failures are not kept)
RESOLVED_KEPT = 1024  # names whose addresses are kept
USER_AGENT = "pgcast-webhooks/1"

Key = tuple[str, str, str, str, int]  # endpoint, scheme, name, address, port


@dataclass(frozen=True)
class Answer:
    """What one attempt got: ok means a 2xx answer."""

    ok: bool
    status: int | None
    error: str | None
    response: str | None
    latency_ms: float


class Refused(Exception):
    """The URL or the address it resolves to is not allowed."""


class _Stale(Exception):
    """A kept connection was closed by the receiver before it answered (send again, once)."""


@dataclass
class _Connection:
    """One open connection to a checked address, with its HTTP/1.1 state."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    http: h11.Connection

    def usable(self) -> bool:
        """Still open and idle (the receiver did not close it meanwhile)."""
        return (not self.writer.transport.is_closing() and not self.reader.at_eof()
                and self.http.our_state is h11.IDLE)

    def close(self) -> None:
        """Close now (no waiting for the peer)."""
        self.writer.transport.abort()


class Poster:
    """POSTs to webhook URLs, keeping one keep-alive connection per endpoint and address."""

    def __init__(self, timeout: float, verify: ssl.SSLContext | bool = True) -> None:
        self.timeout = timeout  # seconds, the whole attempt (resolve, connect, answer)
        # the CA bundle httpx used before (certifi), so a host's trust store does not matter;
        # a test passes a context trusting its own CA
        self.tls = verify if isinstance(verify, ssl.SSLContext) else (
            ssl.create_default_context(cafile=certifi.where()) if verify
            else _unverified())
        self._idle: collections.OrderedDict[Key, _Connection] = collections.OrderedDict()
        self.resolve_ttl = RESOLVE_TTL
        # (name, port) -> (when resolved, its addresses): only successful resolutions
        self._resolved: collections.OrderedDict[tuple[str, int], tuple[float, list[str]]] = \
            collections.OrderedDict()

    async def resolve(self, host: str, port: int) -> str:
        """The address to connect to: every address the name resolves to must be allowed (the
        addresses of a name resolved less than `resolve_ttl` seconds ago are reused, and
        checked again: the rule in force now decides)."""
        try:
            literal = hooks.forbidden(host)
        except ValueError:
            literal = None
        else:
            if literal:
                raise Refused(literal)
            return host
        addresses = await self._addresses(host, port)
        for address in addresses:
            why = hooks.forbidden(address)
            if why:
                raise Refused(f"{host} resolves to a refused address: {why}")
        return addresses[0]

    async def _addresses(self, host: str, port: int) -> list[str]:
        """The name's addresses: kept ones while fresh, else the resolver's (kept on success)."""
        now = time.monotonic()
        kept = self._resolved.get((host, port))
        if kept is not None and now - kept[0] < self.resolve_ttl:
            return kept[1]
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self._resolved.pop((host, port), None)
            raise Refused(f"cannot resolve {host}: {exc}") from None
        addresses = list(dict.fromkeys(str(i[4][0]) for i in infos))
        if not addresses:
            self._resolved.pop((host, port), None)
            raise Refused(f"{host} resolves to no address")
        self._resolved[(host, port)] = (now, addresses)
        self._resolved.move_to_end((host, port))
        while len(self._resolved) > RESOLVED_KEPT:
            self._resolved.popitem(last=False)
        return addresses

    async def post(self, url: str, headers: dict[str, str], body: bytes,
                   endpoint: str = "") -> Answer:
        """One attempt of `endpoint` (its connections are its own), within the timeout; never
        raises for the receiver's faults."""
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):  # no task per attempt, unlike wait_for
                return await self._post(url, headers, body, start, endpoint)
        except TimeoutError:
            return Answer(False, None, f"timed out after {self.timeout:g}s", None,
                          (time.perf_counter() - start) * 1000)

    async def _post(self, url: str, headers: dict[str, str], body: bytes,
                    start: float, endpoint: str) -> Answer:
        try:
            parts = hooks.parse_url(url, names=False)  # the resolved addresses decide
            host = parts.hostname
            assert host is not None
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = await self.resolve(host, port)
        except (sql_errors.InvalidInput, Refused) as exc:
            return Answer(False, None, f"refused: {exc}", None,
                          (time.perf_counter() - start) * 1000)
        default_port = port == (443 if parts.scheme == "https" else 80)
        host_header = f"[{host}]" if ":" in host else host
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sent = [("Host", host_header if default_port else f"{host_header}:{port}"),
                ("User-Agent", USER_AGENT), ("Content-Length", str(len(body))),
                *headers.items()]
        key = (endpoint, parts.scheme, host, address, port)
        try:
            try:
                status, kept = await self._exchange(key, target, sent, body)
            except _Stale:  # the receiver closed a kept connection: a new one, once
                status, kept = await self._exchange(key, target, sent, body)
        except (OSError, ssl.SSLError, h11.ProtocolError, _Stale,
                asyncio.IncompleteReadError) as exc:
            return Answer(False, None, f"{type(exc).__name__}: {exc}"[:500] or "error", None,
                          (time.perf_counter() - start) * 1000)
        if not status:  # the connection ended cleanly before any answer
            return Answer(False, None, "closed without an answer", None,
                          (time.perf_counter() - start) * 1000)
        text = kept.decode("utf-8", "replace")
        ok = 200 <= status < 300
        return Answer(ok, status, None if ok else f"HTTP {status}", text,
                      (time.perf_counter() - start) * 1000)

    async def _connect(self, key: Key) -> _Connection:
        _, scheme, host, address, port = key
        tls = scheme == "https"
        reader, writer = await asyncio.open_connection(
            address, port, ssl=self.tls if tls else None,
            server_hostname=host if tls else None)  # SNI and the certificate: the name
        return _Connection(reader, writer, h11.Connection(h11.CLIENT))

    async def _exchange(self, key: Key, target: str, headers: list[tuple[str, str]],
                        body: bytes) -> tuple[int, bytes]:
        """Send one request on the endpoint's kept connection (or a new one) and read the
        answer: its status and first RESPONSE_KEPT bytes. The connection is kept only when
        both sides finished the exchange cleanly."""
        conn = self._idle.pop(key, None)
        reused = conn is not None and conn.usable()
        if conn is not None and not reused:
            conn.close()
            conn = None
        if conn is None:
            conn = await self._connect(key)
        done = False
        status = 0
        try:
            http = conn.http
            conn.writer.write(http.send(h11.Request(method="POST", target=target,
                                                    headers=headers))
                              + http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage()))
            kept = bytearray()
            length = 0
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    chunk = await conn.reader.read(READ_SIZE)
                    if not chunk and reused and not status:
                        raise _Stale("the kept connection was closed before an answer")
                    http.receive_data(chunk)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    length += len(event.data)
                    if len(kept) < RESPONSE_KEPT:
                        kept += event.data[:RESPONSE_KEPT - len(kept)]
                    if length > DRAIN_MAX:
                        break  # not worth reading to the end: the connection is closed
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
                # an InformationalResponse (1xx) is skipped: the final answer follows
            if http.our_state is h11.DONE and http.their_state is h11.DONE:
                http.start_next_cycle()
                done = True
            return status, bytes(kept)
        except (OSError, h11.RemoteProtocolError):
            if reused and not status:
                raise _Stale("the kept connection was closed before an answer") from None
            raise
        finally:
            if done:
                self._keep(key, conn)
            else:
                conn.close()

    def _keep(self, key: Key, conn: _Connection) -> None:
        self._idle[key] = conn
        while len(self._idle) > CONNECTIONS_KEPT:
            _, old = self._idle.popitem(last=False)
            old.close()

    async def aclose(self) -> None:
        """Close every kept connection."""
        while self._idle:
            _, conn = self._idle.popitem()
            conn.writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await conn.writer.wait_closed()


def _unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
