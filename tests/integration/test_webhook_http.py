"""The webhook POST's HTTP/1.1 path (worker/hookhttp.py on h11): keep-alive per endpoint, a
kept connection the receiver closed, chunked and long answers, answers that close the
connection. A real receiver on a loopback socket whose every answer is scripted bytes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import certifi
import pytest

from pgcast.worker import hookhttp

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class Scripted:
    """A receiver: `answer(n)` gives the bytes for the n-th request of a connection (None:
    close the connection without answering)."""

    answer: Callable[[int], bytes | None]
    close_after: int = 0  # close each connection after this many answers (0: never)
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        """The receiver's http URL."""
        return f"http://127.0.0.1:{self.port}/hook?x=1"


def _read_request(conn: socket.socket, buf: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = bytearray(rest)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    buf[:] = body[length:]
    return head + b"\r\n\r\n" + bytes(body[:length])


def _serve_one(rx: Scripted, conn: socket.socket) -> None:
    buf = bytearray()
    with conn:
        n = 0
        while True:
            request = _read_request(conn, buf)
            if request is None:
                return
            with rx.lock:
                rx.requests.append(request)
            answer = rx.answer(n)
            n += 1
            if answer is None:
                return
            conn.sendall(answer)
            if rx.close_after and n >= rx.close_after:
                return


@contextlib.contextmanager
def scripted(answer: Callable[[int], bytes | None], close_after: int = 0
             ) -> Iterator[Scripted]:
    rx = Scripted(answer, close_after)
    server = socket.create_server(("127.0.0.1", 0))
    rx.port = server.getsockname()[1]

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with rx.lock:
                rx.connections += 1
            threading.Thread(target=_serve_one, args=(rx, conn), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield rx
    finally:
        server.close()


@pytest.fixture(autouse=True)
def local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_HTTP", "1")
    monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_PRIVATE", "1")


def post_many(url: str, n: int, endpoint: str = "ep", pause: float = 0.0
              ) -> list[hookhttp.Answer]:
    async def run() -> list[hookhttp.Answer]:
        poster = hookhttp.Poster(5)
        try:
            answers = []
            for i in range(n):
                answers.append(await poster.post(url, {"Pgcast-Event-Id": f"e{i}"},
                                                 b'{"n": %d}' % i, endpoint))
                if pause:
                    await asyncio.sleep(pause)
            return answers
        finally:
            await poster.aclose()

    return asyncio.run(run())


def test_an_endpoint_keeps_one_connection_for_its_deliveries() -> None:
    with scripted(lambda n: OK) as rx:
        answers = post_many(rx.url, 5)
    assert [a.ok for a in answers] == [True] * 5
    assert [a.response for a in answers] == ["{}"] * 5
    assert rx.connections == 1
    first = rx.requests[0]
    assert first.startswith(b"POST /hook?x=1 HTTP/1.1\r\n")
    assert f"\r\nhost: 127.0.0.1:{rx.port}\r\n".encode() in first.lower()
    assert b"\r\npgcast-event-id: e0\r\n" in first.lower()
    assert first.endswith(b'{"n": 0}')


def test_two_endpoints_never_share_a_connection() -> None:
    async def run(url: str) -> None:
        poster = hookhttp.Poster(5)
        try:
            for endpoint in ("a", "b", "a", "b"):
                assert (await poster.post(url, {}, b"{}", endpoint)).ok
        finally:
            await poster.aclose()

    with scripted(lambda n: OK) as rx:
        asyncio.run(run(rx.url))
    assert rx.connections == 2


def test_a_kept_connection_the_receiver_closed_is_replaced_and_the_post_sent_once() -> None:
    """The receiver closes each connection after one answer: every later POST finds its kept
    connection closed and goes out on a new one; each event reaches the receiver once."""
    with scripted(lambda n: OK, close_after=1) as rx:
        answers = post_many(rx.url, 4, pause=0.05)
    assert [a.ok for a in answers] == [True] * 4
    assert rx.connections == 4
    assert len(rx.requests) == 4


def test_a_connection_closed_without_an_answer_is_retried_once_on_a_new_connection() -> None:
    """The kept connection is closed after reading the request (before any answer): the POST
    is sent once more on a new connection (at least once), and that answer counts."""
    with scripted(lambda n: OK if n == 0 else None) as rx:
        answers = post_many(rx.url, 2)
    assert [a.ok for a in answers] == [True, True]
    assert rx.connections == 2
    assert len(rx.requests) == 3


def test_a_new_connection_closed_without_an_answer_is_a_failed_attempt() -> None:
    with scripted(lambda n: None) as rx:
        answers = post_many(rx.url, 1)
    assert not answers[0].ok and answers[0].status is None
    assert answers[0].error and "RemoteProtocolError" in answers[0].error
    assert len(rx.requests) == 1


def test_a_chunked_answer_keeps_its_first_kib_and_the_connection() -> None:
    body = b"x" * 3000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 700]), body[i:i + 700])
                       for i in range(0, len(body), 700)) + b"0\r\n\r\n"
    answer = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    with scripted(lambda n: answer) as rx:
        answers = post_many(rx.url, 3)
    assert [(a.ok, a.status) for a in answers] == [(True, 201)] * 3
    assert answers[0].response == "x" * hookhttp.RESPONSE_KEPT
    assert rx.connections == 1


def test_a_long_answer_is_cut_and_its_connection_closed() -> None:
    long = b"y" * (hookhttp.DRAIN_MAX + 10_000)
    answer = b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(long), long)
    with scripted(lambda n: answer) as rx:
        answers = post_many(rx.url, 2)
    assert [(a.ok, a.status, a.error) for a in answers] == [(False, 500, "HTTP 500")] * 2
    assert answers[0].response == "y" * hookhttp.RESPONSE_KEPT
    assert rx.connections == 2


def test_an_answer_that_closes_the_connection_is_read_to_its_end() -> None:
    answer = b"HTTP/1.0 200 OK\r\n\r\nclosed at the end"
    with scripted(lambda n: answer, close_after=1) as rx:
        answers = post_many(rx.url, 2)
    assert [(a.ok, a.response) for a in answers] == [(True, "closed at the end")] * 2
    assert rx.connections == 2


def test_an_interim_answer_is_skipped_for_the_final_one() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    with scripted(lambda n: answer) as rx:
        answers = post_many(rx.url, 2)
    assert [(a.ok, a.status) for a in answers] == [(True, 200)] * 2
    assert rx.connections == 1


def test_a_receiver_that_never_answers_times_out() -> None:
    async def run(url: str) -> hookhttp.Answer:
        poster = hookhttp.Poster(0.5)
        try:
            return await poster.post(url, {}, b"{}", "ep")
        finally:
            await poster.aclose()

    server = socket.create_server(("127.0.0.1", 0))
    with server:
        answer = asyncio.run(run(f"http://127.0.0.1:{server.getsockname()[1]}/"))
    assert not answer.ok and answer.error == "timed out after 0.5s"


def test_certificates_are_verified_against_certifis_bundle() -> None:
    expected = ssl.create_default_context(cafile=certifi.where()).get_ca_certs()
    tls = hookhttp.Poster(1).tls
    assert tls.verify_mode == ssl.CERT_REQUIRED and tls.check_hostname
    assert expected and tls.get_ca_certs() == expected


def test_a_names_addresses_are_reused_for_a_while_and_checked_again_each_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolver is asked once per name while its answer is fresh; the kept addresses are
    checked against the rule in force at each delivery; a failed resolution is not kept."""

    async def run() -> tuple[list[str], list[str]]:
        poster = hookhttp.Poster(5)
        loop = asyncio.get_running_loop()
        asked: list[str] = []
        real = loop.getaddrinfo

        async def counting(host: str, *args: object, **kwargs: object) -> object:
            asked.append(host)
            return await real(host, *args, **kwargs)  # type: ignore[arg-type]

        loop.getaddrinfo = counting  # type: ignore[method-assign]
        got = [await poster.resolve("localhost", 80) for _ in range(3)]
        monkeypatch.delenv("PGCAST_WEBHOOKS_ALLOW_PRIVATE")  # the rule changes: kept, refused
        with pytest.raises(hookhttp.Refused, match="refused address"):
            await poster.resolve("localhost", 80)
        monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_PRIVATE", "1")
        poster.resolve_ttl = 0.05
        await asyncio.sleep(0.1)
        got.append(await poster.resolve("localhost", 80))  # stale: asked again
        for _ in range(2):  # a failure is asked again every time
            with pytest.raises(hookhttp.Refused, match="cannot resolve"):
                await poster.resolve("no-such-host.invalid", 80)
        return got, asked

    got, asked = asyncio.run(run())
    assert len(set(got)) == 1 and hookhttp.hooks.forbidden(got[0]) is None
    assert asked == ["localhost", "localhost", "no-such-host.invalid", "no-such-host.invalid"]
