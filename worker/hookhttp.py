"""One webhook POST, safe from SSRF: the name is resolved once, every address it resolves to is
checked, and the connection goes to the checked address (the Host header and TLS SNI carry
the name, and the certificate is verified against the name). No redirect is followed.

httpx (BSD-3-Clause) does the HTTP: a well-kept asynchronous client whose `sni_hostname`
extension lets us connect to an IP while TLS speaks to the name. One client per endpoint
and (name, address, port): a pooled TLS connection verified for one name is never reused for
another, and endpoints never queue behind each other for a connection.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from dataclasses import dataclass

import httpx

from pgcast.sql import errors as sql_errors
from pgcast.sql import hooks

RESPONSE_KEPT = 1024  # bytes of the receiver's answer kept in the delivery log
CLIENTS_KEPT = 256  # idle clients kept (each holds at most a few keep-alive connections)

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


class Poster:
    """POSTs to webhook URLs, keeping a few keep-alive clients."""

    def __init__(self, timeout: float, verify: ssl.SSLContext | bool = True) -> None:
        self.timeout = timeout  # seconds, the whole attempt (resolve, connect, answer)
        self.verify = verify  # the system's CAs; a test passes a context trusting its own
        self._clients: collections.OrderedDict[Key, httpx.AsyncClient] = (
            collections.OrderedDict())

    async def resolve(self, host: str, port: int) -> str:
        """The address to connect to: every address the name resolves to must be allowed."""
        try:
            literal = hooks.forbidden(host)
        except ValueError:
            literal = None
        else:
            if literal:
                raise Refused(literal)
            return host
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Refused(f"cannot resolve {host}: {exc}") from None
        addresses = list(dict.fromkeys(str(i[4][0]) for i in infos))
        if not addresses:
            raise Refused(f"{host} resolves to no address")
        for address in addresses:
            why = hooks.forbidden(address)
            if why:
                raise Refused(f"{host} resolves to a refused address: {why}")
        return addresses[0]

    def _client(self, key: Key) -> httpx.AsyncClient:
        client = self._clients.pop(key, None)
        if client is None:
            client = httpx.AsyncClient(
                follow_redirects=False, trust_env=False,  # no proxy from the environment
                verify=self.verify,
                timeout=httpx.Timeout(self.timeout),
                limits=httpx.Limits(max_connections=2, max_keepalive_connections=1))
        self._clients[key] = client
        while len(self._clients) > CLIENTS_KEPT:
            _, old = self._clients.popitem(last=False)
            asyncio.get_running_loop().create_task(old.aclose())
        return client

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
        netloc = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{netloc}:{port}", fragment="").geturl()
        default_port = port == (443 if parts.scheme == "https" else 80)
        host_header = f"[{host}]" if ":" in host else host
        sent = {**headers, "Host": host_header if default_port else f"{host_header}:{port}"}
        client = self._client((endpoint, parts.scheme, host, address, port))
        try:
            async with client.stream("POST", target, content=body, headers=sent,
                                     extensions={"sni_hostname": host}) as answer:
                kept = bytearray()
                async for chunk in answer.aiter_raw():
                    kept += chunk
                    if len(kept) >= RESPONSE_KEPT:
                        break
            text = bytes(kept[:RESPONSE_KEPT]).decode("utf-8", "replace")
            ok = 200 <= answer.status_code < 300
            return Answer(ok, answer.status_code, None if ok else f"HTTP {answer.status_code}",
                          text, (time.perf_counter() - start) * 1000)
        except httpx.HTTPError as exc:
            return Answer(False, None, f"{type(exc).__name__}: {exc}"[:500] or "error", None,
                          (time.perf_counter() - start) * 1000)

    async def aclose(self) -> None:
        """Close every kept client."""
        while self._clients:
            _, client = self._clients.popitem()
            await client.aclose()
