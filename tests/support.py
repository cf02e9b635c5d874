"""Test helpers shared by the integration and acceptance rings: servers, processes, waits."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_dbname(url: str, dbname: str) -> str:
    """The same server, another database."""
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


def connect(url: str) -> psycopg.Connection[dict[str, Any]]:
    """An autocommit connection with dict rows."""
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, every: float = 0.05,
             what: str = "condition") -> Any:
    """Poll until predicate() is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def pgcast_env(db_url: str, **extra: str) -> dict[str, str]:
    """The environment a pgcast process under test runs with."""
    env = dict(os.environ)
    env["DATABASE_URL"] = db_url
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("PGCAST_LOG_LEVEL", "WARNING")
    env.update(extra)
    return env


def pgcast(db_url: str, *args: str, env: dict[str, str] | None = None,
           check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one `pgcast` command to completion."""
    done = subprocess.run([sys.executable, "-m", "pgcast.bin.cli", *args], cwd=ROOT,
                          env=env or pgcast_env(db_url), capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"pgcast {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


class Processes:
    """Real `pgcast` processes started by a test; all killed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, db_url: str, *args: str, **env: str) -> subprocess.Popen[str]:
        """Start `pgcast ARGS` in the background; its output goes to a log file."""
        with (self.tmp / f"proc-{len(self.procs)}.log").open("w") as log:
            # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-m", "pgcast.bin.cli", *args], cwd=ROOT,
                                    env=pgcast_env(db_url, **env), stdout=log,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[str]) -> str:
        """What a process printed so far."""
        return (self.tmp / f"proc-{self.procs.index(proc)}.log").read_text()

    def stop(self, proc: subprocess.Popen[str], sig: int = signal.SIGTERM,
             timeout: float = 30) -> int:
        """Signal one process and wait for it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        return proc.wait(timeout=timeout)

    def cleanup(self) -> None:
        """Kill whatever is still running."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


class MotoServer:
    """moto's SES-compatible HTTP server, in its own process, on a loopback port: with
    SendBulkEmail (tests.motobulk), or moto's own as it ships (`plain`: no SendBulkEmail)."""

    def __init__(self, plain: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server" if plain else "tests.motobulk",
             "-H", "127.0.0.1", "-p", str(self.port)], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self._up, timeout=30, what="moto server")

    def _up(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
            return True
        except OSError:
            return False

    def env(self) -> dict[str, str]:
        """What boto3 needs to talk to this server."""
        return {"AWS_ENDPOINT_URL_SESV2": self.url, "AWS_ENDPOINT_URL_SES": self.url,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                # a worker with the ses provider refuses to start without both
                "PGCAST_PUBLIC_URL": "https://pgcast.example",
                "PGCAST_UNSUBSCRIBE_SECRET": "test-unsubscribe-secret-of-at-least-32-bytes"}

    def reset(self) -> None:
        """Forget every identity and message."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def verify(self, address: str) -> None:
        """Verify a sender identity (SES refuses unverified senders)."""
        import boto3

        client = boto3.client("sesv2", endpoint_url=self.url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_email_identity(EmailIdentity=address)

    def messages(self) -> list[dict[str, Any]]:
        """Every message the server accepted."""
        with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=30) as r:
            data = json.load(r)
        return list(data.get("ses", {}).get("Message", []))

    def bulk_entries(self) -> list[dict[str, Any]]:
        """Every SendBulkEmail entry the server received, as tests.motobulk keeps them."""
        with urllib.request.urlopen(f"{self.url}/_motobulk/entries", timeout=30) as r:
            return list(json.load(r))

    def bulk_faults(self, by_pattern: dict[str, str] | None = None) -> None:
        """Answer the SendBulkEmail entries whose address matches a pattern (a regular
        expression) with that Status (tests.motobulk); none: no faults."""
        req = urllib.request.Request(f"{self.url}/_motobulk/faults", method="POST",
                                     data=json.dumps(by_pattern or {}).encode())
        urllib.request.urlopen(req, timeout=10).close()

    def close(self) -> None:
        """Stop the server process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def fresh_database(server_url: str, template: str) -> Iterator[str]:
    """A new database cloned from the migrated template; dropped afterwards."""
    name = f"pgcast_test_{uuid.uuid4().hex[:12]}"
    with connect(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')  # type: ignore[arg-type]
    try:
        yield with_dbname(server_url, name)
    finally:
        with connect(server_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def seed_contacts(conn: psycopg.Connection[Any], n: int, *, account: str = "default",
                  tag: str | None = None, start: int = 0, domain: str = "example.com") -> None:
    """n contacts user<i>@domain (i from start), optionally all tagged."""
    conn.execute(
        "INSERT INTO contacts (account, email, name, tags) "
        "SELECT %s, 'user' || g || '@' || %s::text, 'User ' || g, %s::text[] "
        "FROM generate_series(%s::int, %s::int) g",
        (account, domain, [tag] if tag else [], start, start + n - 1))


def new_broadcast(conn: psycopg.Connection[Any], *, account: str = "default",
                  tag: str | None = None, from_address: str = "news@example.com",
                  send: bool = True, allow_empty: bool = False) -> uuid.UUID:
    """A draft (sent unless send=False); returns its id."""
    from pgcast.sql import broadcasts

    row = broadcasts.create(conn, account, subject="Hello", from_address=from_address,
                            text="Hello there", tag=tag)
    if send:
        result = broadcasts.send(conn, account, row["id"], allow_empty=allow_empty)
        assert result["success"], result
    return uuid.UUID(str(row["id"]))


def progress(conn: psycopg.Connection[Any], bid: uuid.UUID) -> dict[str, Any]:
    """The broadcast_progress row."""
    row = conn.execute("SELECT * FROM broadcast_progress WHERE broadcast_id = %s",
                       (bid,)).fetchone()
    assert row is not None
    return dict(row)


def status_counts(conn: psycopg.Connection[Any], bid: uuid.UUID) -> dict[str, int]:
    """count(*) of recipient rows by status."""
    rows = conn.execute("SELECT status, count(*) AS n FROM broadcast_recipients "
                        "WHERE broadcast_id = %s GROUP BY status", (bid,)).fetchall()
    return {r["status"]: int(r["n"]) for r in rows}


def assert_counters_true(conn: psycopg.Connection[Any], bid: uuid.UUID) -> dict[str, Any]:
    """The O(1) counters equal count(*) over the recipient rows (invariant 6)."""
    p = progress(conn, bid)
    counts = status_counts(conn, bid)
    for status in ("sent", "failed", "skipped", "unknown", "cancelled"):
        assert p[status] == counts.get(status, 0), (status, p, counts)
    in_progress = sum(counts.get(s, 0) for s in ("pending", "claimed", "sending"))
    assert p["pending"] == in_progress, (p, counts)
    assert p["total"] == sum(counts.values()), (p, counts)
    return p


class PgBouncer:
    """Debian's PgBouncer in transaction pooling mode in front of a server, on a free port.

    Runs as `postgres` (or `nobody`) when we are root: PgBouncer refuses to run as root.
    """

    BINARY = "/usr/sbin/pgbouncer"

    def __init__(self, server_url: str, pool_size: int = 20) -> None:
        import tempfile

        from tests import realpg

        params = conninfo_to_dict(server_url)
        self.port = free_port()
        # its own directory: pytest's are private to us, and PgBouncer runs as another user
        self.base = base = Path(tempfile.mkdtemp(prefix="pgcast-pgbouncer-"))
        os.chmod(base, 0o755)
        user = realpg.run_as()
        realpg.give(base, user)
        (base / "users.txt").write_text(f'"{params.get("user", "postgres")}" ""\n')
        ini = base / "pgbouncer.ini"
        ini.write_text("\n".join([
            "[databases]",
            f"* = host={params.get('host', '127.0.0.1')} port={params.get('port', 5432)}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {base / 'users.txt'}",
            "pool_mode = transaction",
            "max_client_conn = 2000",
            f"default_pool_size = {pool_size}",
            f"logfile = {base / 'pgbouncer.log'}",
            f"pidfile = {base / 'pgbouncer.pid'}",
            "",
        ]))
        with (base / "stderr.log").open("w") as err:
            self.proc = subprocess.Popen([self.BINARY, str(ini)], user=user,
                                         stdout=err, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.params = params
        wait_for(self._up, timeout=30, what="pgbouncer")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"pgbouncer exited {self.proc.returncode}: {self.log()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def url(self, direct_url: str) -> str:
        """The same database as `direct_url`, through this PgBouncer."""
        params = conninfo_to_dict(direct_url)
        params.update(host="127.0.0.1", port=str(self.port))
        return make_conninfo(**params)

    def log(self) -> str:
        """What PgBouncer logged."""
        return "".join(p.read_text() for p in (self.base / "stderr.log",
                                                self.base / "pgbouncer.log") if p.exists())

    def close(self) -> None:
        """Stop PgBouncer."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.base, ignore_errors=True)
