"""`make demo`: the whole system on the embedded Postgres, end to end, in about a minute."""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from pgcast.bin import api_commands, cli, progressbar
from pgcast.sql import broadcasts, contacts, db, embedded, migrate

CONTACTS = int(os.environ.get("PGCAST_DEMO_CONTACTS", "3000"))
SUBJECT = "pgcast demo: hello {{ contact.name | default('friend', true) }}"
TEXT = ("Hello {{ contact.name | default('friend', true) }},\n\nThis message went through a "
        "Postgres-only broadcast engine, personalised for {{ contact.email }}.\n\n"
        "Unsubscribe: {{ unsubscribe_url }}\n")
HTML = ("<p>Hello {{ contact.name | default('friend', true) }},</p><p>This message went "
        "through a Postgres-only broadcast engine, personalised for {{ contact.email }}.</p>"
        '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>')
WORKERS = 2
ACCOUNT = cli.ACCOUNT_DEFAULT  # the CLI's default: `pgcast broadcast list` shows the demo's


def say(text: str) -> None:
    """One step of the story."""
    print(f"\n==> {text}", flush=True)


def generate_contacts(path: Path) -> list[str]:
    """A CSV of CONTACTS people, a third tagged beta; returns a few to unsubscribe."""
    rng = random.Random()  # new people leave on every run
    lines = ["email,name,tags"]
    for i in range(CONTACTS):
        tags = "beta;early" if i % 3 == 0 else ("early" if i % 5 == 0 else "")
        lines.append(f"person{i}@example.com,Person {i},{tags}")
    lines.append("not-an-address,Broken Row,")  # shows the import's rejection report
    path.write_text("\n".join(lines) + "\n")
    return [f"person{i}@example.com" for i in rng.sample(range(CONTACTS), min(60, CONTACTS))]


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """One `pgcast worker` process with the file provider."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "pgcast.bin.cli", "worker",
                                 "--concurrency", "2", "--group-size", "25"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def start_api(home: Path, env: dict[str, str]) -> tuple[str, str]:
    """`pgcast api` in the background (left running for the curl line); returns URL and pid."""
    pid_file = home / "demo-api.pid"
    if pid_file.exists():  # the API of an earlier demo run
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            time.sleep(1)
    port = int(os.environ.get("PGCAST_DEMO_PORT", "8080"))
    if not _port_free(port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    with (home / "demo-api.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pgcast.bin.cli", "api",
                                 "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1).close()
            return url, str(proc.pid)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"pgcast api did not start; see {home / 'demo-api.log'}") from None
            time.sleep(0.2)


def jwt_secret(home: Path) -> str:
    """PGCAST_JWT_SECRET, else one generated once for the demo and kept in $PGCAST_HOME."""
    if os.environ.get("PGCAST_JWT_SECRET"):
        return os.environ["PGCAST_JWT_SECRET"]
    path = home / "demo-jwt-secret"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def main() -> int:
    """Run the demo."""
    home = embedded.home()
    outbox = home / "outbox"
    say(f"starting the embedded Postgres in {home} (or using DATABASE_URL if set)")
    url = db.database_url()
    with db.connect(url) as conn:
        applied = migrate.migrate(conn)
    print("migrations:", ", ".join(applied) if applied else "already up to date")

    say(f"importing {CONTACTS} generated contacts (a third tagged 'beta')")
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "contacts.csv"
        leaving = generate_contacts(csv_path)
        batch = contacts.validate(contacts.read_csv(csv_path))
    with db.connect(url) as conn:
        written = contacts.upsert(conn, ACCOUNT, batch.rows)
        for r in batch.rejected:
            print(f"  rejected line {r.where}: {r.email}: {r.reason}")
        for address in leaving[:30]:
            contacts.unsubscribe(conn, ACCOUNT, address, source="demo")
        conn.commit()
    print(f"  upserted {written.inserted + written.updated}, rejected {len(batch.rejected)}, "
          "unsubscribed 30 before the send")

    say("creating a broadcast to everyone")
    with db.connect(url, autocommit=True) as conn:
        draft = broadcasts.create(
            conn, ACCOUNT, subject=SUBJECT, from_address="pgcast demo <demo@example.com>",
            text=TEXT, html=HTML)
    bid = draft["id"]
    print(f"  broadcast {bid} (draft)")

    env = dict(os.environ, DATABASE_URL=url, PGCAST_PROVIDER="file",
               PGCAST_OUTBOX_DIR=str(outbox), PGCAST_LOG_LEVEL="WARNING",
               PGCAST_JWT_SECRET=jwt_secret(home))
    say("starting the HTTP API (pgcast api): it also serves the one-click unsubscribe links")
    api_url, api_pid = start_api(home, env)
    env["PGCAST_PUBLIC_URL"] = api_url  # where the messages' unsubscribe links point
    say(f"starting {WORKERS} worker processes (provider: file, outbox {outbox})")
    logs = [home / f"demo-worker-{i}.log" for i in range(WORKERS)]
    workers = [start_worker(env, log) for log in logs]
    os.environ["PGCAST_JWT_SECRET"] = env["PGCAST_JWT_SECRET"]
    token = api_commands.make_token(ACCOUNT, sub="demo", ttl=24 * 3600)
    print(f"  {api_url} (pid {api_pid})")
    try:
        say("sending: the snapshot is taken in the same transaction as draft -> sending")
        with db.connect(url, autocommit=True) as conn:
            result = broadcasts.send(conn, ACCOUNT, bid)
            print(f"  {result}")
            # these leave after the snapshot: the handoff fence skips whoever is not mailed yet
            for address in leaving[30:]:
                contacts.unsubscribe(conn, ACCOUNT, address, source="demo")
            print("  30 more contacts unsubscribed after the send")
            print()
            final = progressbar.watch(lambda: broadcasts.progress(conn, ACCOUNT, bid))
        summarize(final, outbox / str(bid), url)
        show_one(outbox / str(bid), url)
        say("the same progress over HTTP (the API stays up; stop it with "
            f"`kill {api_pid}`):")
        curl = (f"curl -s -H 'Authorization: Bearer {token}' "
                f"{api_url}/broadcasts/{bid}/progress")
        print(f"  {curl}")
        req = urllib.request.Request(f"{api_url}/broadcasts/{bid}/progress",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as answer:
            print(f"  -> {answer.read().decode()}")
        dashboard(api_url, token, home)
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
        print(f"\nworkers stopped (logs: {', '.join(str(p) for p in logs)})")
    return 0


def dashboard(api_url: str, token: str, home: Path) -> None:
    """How to look at the same broadcast in the dashboard and the CLI, after the demo."""
    say(f"the dashboard: open {api_url}/ and paste this token (account {ACCOUNT}, 24 hours):")
    print(f"  {token}")
    print("  another token, any time the API above runs:")
    print(f"    PGCAST_JWT_SECRET=$(cat {home / 'demo-jwt-secret'}) "
          f".venv/bin/pgcast token --sub you")
    print("  the CLI shows the same account by default:")
    print("    .venv/bin/pgcast broadcast list")
    print("    .venv/bin/pgcast contacts count")


def show_one(folder: Path, url: str) -> None:
    """One personalised message, then its one-click unsubscribe link at work."""
    files = sorted(folder.glob("*.eml"))
    if not files:
        return
    parsed = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    say(f"one personalised message ({files[0].name}):")
    for header in ("From", "To", "Subject", "List-Unsubscribe", "List-Unsubscribe-Post"):
        print(f"  {header}: {parsed[header]}")
    assert isinstance(parsed, email.message.EmailMessage)
    text = parsed.get_body(preferencelist=("plain",))
    if text is not None:
        print("  " + str(text.get_content()).strip().replace("\n", "\n  "))
    link = str(parsed["List-Unsubscribe"]).strip("<>")
    say("a mail client's one-click unsubscribe (RFC 8058): POST List-Unsubscribe=One-Click")
    request = urllib.request.Request(link, data=b"List-Unsubscribe=One-Click", method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        print(f"  POST {link[:60]}... -> {answer.status}")
    to = parsed["To"].addresses[0].addr_spec
    with db.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT c.unsubscribed_at, e.source FROM contacts c JOIN "
                           "contact_events e ON e.contact_id = c.id WHERE c.account = %s AND "
                           "c.email = %s ORDER BY e.at DESC LIMIT 1", (ACCOUNT, to)).fetchone()
    if row:
        print(f"  {to} unsubscribed at {row['unsubscribed_at']:%H:%M:%S} "
              f"(contact_events source: {row['source']})")


def summarize(p: dict[str, Any], folder: Path, url: str) -> None:
    """The closing summary."""
    files = sorted(folder.glob("*.eml"), key=lambda f: f.stat().st_mtime)
    took = (p["finished_at"] - p["started_at"]).total_seconds() if p["finished_at"] else 0.0
    say(f"broadcast {p['status']} in {took:.1f}s")
    print(f"  total {p['total']}  sent {p['sent']}  skipped {p['skipped']}  "
          f"failed {p['failed']}  unknown {p['unknown']}")
    print(f"  {len(files)} .eml files in {folder}")
    if files:
        print(f"  for example: {files[0]}")
    print("\n  DBAs read the same figures with plain SQL:")
    print(f"    psql '{url}' -c \"SELECT * FROM broadcast_progress "
          f"WHERE broadcast_id = '{p['broadcast_id']}'\"")


if __name__ == "__main__":
    sys.exit(main())
