"""A real `pgcast api` (uvicorn) stays responsive whatever one request carries (issue 11 §4).

Ordering, not timing: each test asserts which answer arrives first over real sockets.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg

from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
CONTACTS = 10_000  # the most one POST /contacts takes


@contextlib.contextmanager
def running_api(db_url: str, procs: support.Processes, *args: str,
                **env: str) -> Iterator[str]:
    """A `pgcast api` on a free port; yields its base URL."""
    port = support.free_port()
    base = f"http://127.0.0.1:{port}"
    proc = procs.start(db_url, "api", "--port", str(port), *args, PGCAST_JWT_SECRET=h.SECRET,
                       PGCAST_API_EVENTS_INTERVAL="0.1", **env)
    support.wait_for(lambda: h.api_up(base) or proc.poll() is not None, timeout=60,
                     what="pgcast api")
    assert proc.poll() is None, procs.log(proc)
    yield base
    procs.stop(proc, timeout=60)
    assert "Traceback" not in procs.log(proc), procs.log(proc)


def _request(method: str, path: str, body: bytes = b"", token: str | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if method == "POST":
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One whole HTTP/1.1 response with a Content-Length: (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the headers"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines
                  if line.lower().startswith("content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return int(lines[0].split()[1]), rest


def _queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(tx_queue, rx_queue) bytes of the loopback TCP socket local_port -> remote_port."""
    local, remote = f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


def _server_has_read_everything(sock: socket.socket, server_port: int) -> bool:
    """Every byte sent on sock is acknowledged and read out of the server's socket buffer."""
    client_port = sock.getsockname()[1]
    ours, theirs = _queues(client_port, server_port), _queues(server_port, client_port)
    return ours is not None and theirs is not None and ours[0] == 0 and theirs[1] == 0


def _huge_contacts_body() -> bytes:
    """10,000 contacts, each valid up to its last tag, which holds a line feed.

    Every item costs the whole validation (address, a 150-character name, 50 tags) and is
    then rejected, so the request writes nothing: its answer follows its CPU work directly.
    """
    tags = [f"tag{j:03d}" for j in range(49)] + ["bad\ntag"]
    items = [{"email": f"person{i}@example.com", "name": "N" * 150, "tags": tags}
             for i in range(CONTACTS)]
    return json.dumps({"contacts": items}).encode()


def test_healthz_is_answered_while_a_huge_body_is_validated(db_url: str,
                                                            procs: support.Processes) -> None:
    body = _huge_contacts_body()
    assert len(body) < 8 * 1024 * 1024
    token = h.token(ttl=600)
    with running_api(db_url, procs) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow, \
                socket.create_connection(("127.0.0.1", port)) as probe:
            probe.sendall(_request("GET", "/healthz"))  # warm: the pool holds a connection
            assert _read_response(probe)[0] == 200
            request = _request("POST", "/contacts", body, token)
            slow.sendall(request[:-1])
            # the server has read all but the last byte and waits for it: its loop is idle
            support.wait_for(lambda: _server_has_read_everything(slow, port), timeout=60,
                             what="the server to read the body")
            slow.sendall(request[-1:])  # now it parses and validates 10,000 contacts
            probe.sendall(_request("GET", "/healthz"))
            status, answer = _read_response(probe)
            assert (status, json.loads(answer)) == (200, {"status": "ok"})
            # the slow request has not ended when /healthz has been answered
            readable, _, _ = select.select([slow], [], [], 0)
            assert readable == [], "the huge request ended before /healthz was answered"
            status, answer = _read_response(slow)
    assert status == 200
    result = json.loads(answer)
    assert result["upserted"] == 0 and len(result["rejected"]) == CONTACTS
    assert result["rejected"][0]["reason"].startswith("tags: must not contain")


def _stream(base: str, path: str, headers: dict[str, str], opened: threading.Event,
            first: list[str]) -> None:
    """Hold an SSE stream open until the server ends it; record the first event's name."""
    with contextlib.suppress(httpx.HTTPError), \
            httpx.stream("GET", f"{base}{path}", headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event: ") and not first:
                first.append(line[len("event: "):])
                opened.set()


def test_streams_at_their_cap_leave_room_for_healthz_and_requests(
        db_url: str, conn: Conn, procs: support.Processes) -> None:
    drafts = {a: support.new_broadcast(conn, account=a, send=False)
              for a in ("acme", "other", "third")}
    # --limit-concurrency 4: at most 2 streams in the process, 1 per account
    with running_api(db_url, procs, "--limit-concurrency", "4", "--timeout-keep-alive", "30",
                     PGCAST_API_MAX_STREAMS="1") as base:
        readers = []
        for account in ("acme", "other"):
            opened, first = threading.Event(), []  # type: ignore[var-annotated]
            t = threading.Thread(target=_stream, daemon=True, args=(
                base, f"/broadcasts/{drafts[account]}/events", h.auth(account), opened, first))
            t.start()
            assert opened.wait(30) and first == ["progress"]
            readers.append(t)
        with httpx.Client(base_url=base, timeout=30) as client:  # one keep-alive connection
            r = client.get(f"/broadcasts/{drafts['acme']}/events", headers=h.auth("acme"))
            assert r.status_code == 429 and r.json()["error"] == "too_many_streams"
            assert r.headers["retry-after"]
            r = client.get(f"/broadcasts/{drafts['third']}/events", headers=h.auth("third"))
            assert r.status_code == 429, r.text  # the process-wide cap: half of 4
            for _ in range(5):
                assert client.get("/healthz").status_code == 200
                r = client.get("/broadcasts", headers=h.auth("acme"))
                assert r.status_code == 200 and len(r.json()["broadcasts"]) == 1
    for t in readers:  # SIGTERM ended the streams
        t.join(30)
        assert not t.is_alive()


def test_limit_flags_are_checked(db_url: str) -> None:
    env = support.pgcast_env(db_url, PGCAST_JWT_SECRET=h.SECRET)
    done = support.pgcast(db_url, "api", "--port", str(support.free_port()),
                          "--limit-concurrency", "1", env=env, check=False)
    assert (done.returncode, done.stderr.strip()) == (
        2, "pgcast: error: --limit-concurrency must be at least 4: 1")
    env["PGCAST_API_TIMEOUT_KEEP_ALIVE"] = "soon"
    done = support.pgcast(db_url, "api", "--port", str(support.free_port()), env=env,
                          check=False)
    assert (done.returncode, done.stderr.strip()) == (
        2, "pgcast: error: PGCAST_API_TIMEOUT_KEEP_ALIVE is not a number: 'soon'")

