"""The SES client's connections (worker.sesconn): a gate that opens a few at a time, idle
ones retired, bytes written counted per call, and a failure classified by them. Real boto3
against bench.sesd, the local SES-compatible endpoint, in this process (no database)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import struct
import threading
import uuid
from collections.abc import Iterator

import botocore.exceptions
import pytest

from bench import sesd
from pgcast.worker import errors, render, ses, sesconn

CONTENT = render.Content(str(uuid.uuid4()), "a", "S", "f@example.com", "t", None)


def message(i: int) -> render.Message:
    return render.render(CONTENT, i, f"u{i}@example.com", None)


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[ses.SesProvider]:
    with sesd.running(0.05) as endpoint:
        for key, value in endpoint.env().items():
            monkeypatch.setenv(key, value)
        yield ses.SesProvider.from_env(32)


def test_the_gate_lets_a_burst_through_then_one_per_interval() -> None:
    gate = sesconn.Connections(rate=100.0, burst=2)
    delays = [gate.book() for _ in range(6)]
    assert delays[:2] == [0.0, 0.0]
    for i, d in enumerate(delays[2:], start=1):
        assert d == pytest.approx(i / 100, abs=0.005)
    assert gate.waited == 4


def test_calls_at_once_open_connections_through_the_gate_and_reuse_them(
        provider: ses.SesProvider) -> None:
    conns = provider.connections
    assert conns.tracking
    conns.rate = 20.0  # a new connection every 50 ms past the burst: the calls below, all
    # started together, ask for theirs well within that even on a loaded machine
    together = threading.Barrier(16)

    def send(i: int) -> str:
        together.wait(timeout=30)  # 16 calls at once, not as the pool's threads happen to start
        return provider.send(message(i))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(send, range(16)))
    assert len(set(ids)) == 16
    first = conns.counts()
    assert 1 <= first["opened"] <= 16 and first["waited"] >= 1, first  # not 16 at once
    assert conns.connected == first["opened"]
    for i in range(5):  # one after another: a warm connection each time
        provider.send(message(100 + i))
    assert conns.counts()["opened"] == first["opened"]


def test_a_connection_idle_longer_than_the_limit_is_retired_not_reused(
        provider: ses.SesProvider) -> None:
    provider.send(message(1))
    provider.connections.idle_retire = 0.0
    provider.send(message(2))
    counts = provider.connections.counts()
    assert counts["retired_idle"] >= 1 and counts["opened"] == 2, counts


@contextlib.contextmanager
def resetting() -> Iterator[str]:
    """A server that reads a request and resets the connection (RST), never answering."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()
        thread.join(5)


def test_a_reset_after_the_request_was_written_is_unknown_and_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with sesd.running(0.0) as endpoint, resetting() as url:
        for key, value in {**endpoint.env(), "AWS_ENDPOINT_URL_SESV2": url}.items():
            monkeypatch.setenv(key, value)
        provider = ses.SesProvider.from_env(4)
        with pytest.raises(errors.OutcomeUnknown):
            provider.send(message(1))
    counts = provider.connections.counts()
    assert counts["unknown_after_write"] == 1 and counts["failed_before_write"] == 0, counts


def test_a_transport_failure_with_nothing_written_is_transient() -> None:
    closed = botocore.exceptions.ConnectionClosedError(endpoint_url="http://x")
    assert isinstance(ses.classify(closed, written=0), errors.Transient)
    assert isinstance(ses.classify(closed, written=120), errors.OutcomeUnknown)
    assert isinstance(ses.classify(closed), errors.OutcomeUnknown)  # not counted: the worst
    timeout = botocore.exceptions.ReadTimeoutError(endpoint_url="http://x")
    assert isinstance(ses.classify(timeout, written=0), errors.OutcomeUnknown)


def test_without_the_gate_installed_every_failure_is_in_doubt() -> None:
    conns = sesconn.Connections()
    conns.begin()
    assert conns.written() == 1  # bytes are not counted: assume some were written


def test_the_counts_are_metrics_however_often_a_provider_is_wrapped(
        provider: ses.SesProvider) -> None:
    import prometheus_client as prom

    from pgcast.worker import metrics

    provider.send(message(1))
    for _ in range(2):  # one collector per process, reading the newest provider
        metrics.MeteredProvider(provider)
    text = prom.generate_latest().decode()
    assert 'pgcast_provider_connections_total{event="opened"} 1.0' in text
    assert 'pgcast_provider_transport_failures_total{cause="after_write"} 0.0' in text
