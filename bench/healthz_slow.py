"""/healthz latency while one huge POST /contacts is being served, before and after a change.

    python -m bench.healthz_slow [--before eb44a82] [--rounds 3] [--contacts 10000]

Starts `pgcast api` (uvicorn, its own process) on an embedded Postgres in a temp dir (or on
DATABASE_URL, in a fresh database dropped at the end), from this checkout and, with
--before COMMIT, from that commit's tree (`git archive`, in a temp dir). In each round, for
each tree (back to back: paired rounds), it sends one huge POST /contacts (--contacts items
of a 150-character name and 50 tags, each rejected at its last tag, so the request is pure
CPU work: about 6 MB), waits until the server has read all of it but the last byte, sends
that byte, and then asks GET /healthz on another connection again and again, one at a time,
until the huge request is answered. Figures: the slowest /healthz answer (the one a load
balancer's health check would see), the median, and how many were answered meanwhile.
Linux only: it reads /proc/net/tcp to know the server has read the body.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

from pgcast.api import auth, config
from pgcast.sql import embedded, migrate

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-0123456789-abcdefghijklmnop"
ACCOUNT = "bench"


def huge_body(n: int) -> bytes:
    """n contacts, each fully validated then rejected at its last tag (nothing is written)."""
    tags = [f"tag{j:03d}" for j in range(49)] + ["bad\ntag"]
    return json.dumps({"contacts": [{"email": f"person{i}@example.com", "name": "N" * 150,
                                     "tags": tags} for i in range(n)]}).encode()


def request(method: str, path: str, body: bytes = b"", token: str | None = None) -> bytes:
    """One HTTP/1.1 request."""
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if body:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def read_response(sock: socket.socket) -> int:
    """Read one whole response with a Content-Length; its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(x.split(":", 1)[1]) for x in lines if x.lower().startswith("content-length"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed")
        rest += chunk
    return int(lines[0].split()[1])


def _queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    local, remote = f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            f = line.split()
            if f[1] == local and f[2] == remote:
                tx, rx = f[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


def wait_read(sock: socket.socket, port: int) -> None:
    """Until every byte sent on sock has been read by the server process."""
    mine = sock.getsockname()[1]
    deadline = time.monotonic() + 60
    while True:
        ours, theirs = _queues(mine, port), _queues(port, mine)
        if ours and theirs and ours[0] == 0 and theirs[1] == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not read the body")
        time.sleep(0.005)


def one_round(port: int, token: str, body: bytes) -> dict[str, float]:
    """One huge request and the /healthz answers while it is served (ms)."""
    latencies: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as slow, \
            socket.create_connection(("127.0.0.1", port)) as probe:
        probe.sendall(request("GET", "/healthz"))
        read_response(probe)  # warm
        huge = request("POST", "/contacts", body, token)
        slow.sendall(huge[:-1])
        wait_read(slow, port)
        slow.sendall(huge[-1:])
        t0 = time.perf_counter()
        sent = time.perf_counter()
        probe.sendall(request("GET", "/healthz"))
        slow_ms = None
        while True:
            readable, _, _ = select.select([slow, probe], [], [])
            if probe in readable:
                assert read_response(probe) == 200
                latencies.append((time.perf_counter() - sent) * 1000)
                if slow_ms is not None:
                    break  # the answer that was in flight when the huge request ended
                sent = time.perf_counter()
                probe.sendall(request("GET", "/healthz"))
            if slow in readable and slow_ms is None:
                assert read_response(slow) == 200
                slow_ms = (time.perf_counter() - t0) * 1000
    return {"slow_ms": slow_ms or 0.0, "max_ms": max(latencies),
            "p50_ms": statistics.median(latencies), "answers": float(len(latencies))}


def _up(base: str) -> bool:
    try:
        urllib.request.urlopen(f"{base}/healthz", timeout=1).close()
        return True
    except OSError:
        return False


def serve(tree: Path, url: str) -> tuple[subprocess.Popen[bytes], int]:
    """`pgcast api` from `tree` on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DATABASE_URL=url, PGCAST_JWT_SECRET=SECRET,
               PGCAST_LOG_LEVEL="warning", PYTHONPATH=str(tree))
    server = subprocess.Popen([sys.executable, "-m", "pgcast.bin.cli", "api", "--port", str(port)],
                              cwd=tree, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while not _up(f"http://127.0.0.1:{port}"):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pgcast api from {tree} did not start")
        time.sleep(0.1)
    return server, port


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group and wait."""
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def export(commit: str, into: Path) -> Path:
    """The tree of `commit`, extracted into a directory (the repository is not touched)."""
    archive = into / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), commit], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def run(url: str, args: argparse.Namespace, trees: dict[str, Path]) -> dict[str, list[Any]]:
    """Every round, each tree back to back; the figures per tree."""
    with psycopg.connect(url, autocommit=True) as conn:
        migrate.migrate(conn)
    token = auth.make_token(config.from_env({"PGCAST_JWT_SECRET": SECRET}), ACCOUNT, "bench")
    body = huge_body(args.contacts)
    out: dict[str, list[Any]] = {name: [] for name in trees}
    servers = {name: serve(tree, url) for name, tree in trees.items()}
    try:
        for _ in range(args.rounds):
            for name, (_, port) in servers.items():
                out[name].append(one_round(port, token, body))
    finally:
        for server, _ in servers.values():
            stop(server)
    return out


def main() -> int:
    """Print the figures and the command."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", metavar="COMMIT", help="also measure this commit's code")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--contacts", type=int, default=10_000)
    args = p.parse_args()
    command = "python -m bench.healthz_slow " + shlex.join(sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix="pgcast-bench-"))
    os.chmod(work, 0o755)
    trees = {"this checkout": ROOT}
    if args.before:
        trees = {f"before ({args.before})": export(args.before, work), **trees}
    server_url = os.environ.get("DATABASE_URL")
    name = f"pgcast_bench_{uuid.uuid4().hex[:8]}"
    if server_url:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
        url = make_conninfo(server_url, dbname=name)
    else:
        url = embedded.start(work / "pg")
    try:
        figures = run(url, args, trees)
    finally:
        if server_url:
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    pgsql.Identifier(name)))
        else:
            embedded.discard(work / "pg")
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"$ {command.strip()}")
    print(f"GET /healthz, one at a time, while one POST /contacts of {args.contacts:,} contacts "
          f"({len(huge_body(args.contacts)) / 1e6:.1f} MB) is served; median of "
          f"{args.rounds} rounds (each round: every tree back to back)")
    print(f"{'code':<24}{'huge request ms':>16}{'healthz max ms':>16}{'healthz p50 ms':>16}"
          f"{'answers':>9}")
    for label, rounds in figures.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        print(f"{label:<24}{med['slow_ms']:>16.0f}{med['max_ms']:>16.1f}{med['p50_ms']:>16.1f}"
              f"{med['answers']:>9.0f}")
    if len(figures) == 2:
        before, after = figures.values()
        ratios = [b["max_ms"] / a["max_ms"] for b, a in zip(before, after, strict=True)]
        medians = (statistics.median(b["max_ms"] for b in before)
                   / statistics.median(a["max_ms"] for a in after))
        print(f"healthz max, before / after: median of paired rounds "
              f"{statistics.median(ratios):.0f}× (ratio of the medians {medians:.0f}×)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
