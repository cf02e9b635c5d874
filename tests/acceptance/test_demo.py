"""`make demo`'s program: it works in the CLI's default account and ends with a working
dashboard sign-in."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests import support


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_demo_ends_with_the_dashboard_and_the_cli_sees_its_broadcast(
        db_url: str, tmp_path: Path) -> None:
    env = support.pgcast_env(db_url, PGCAST_HOME=str(tmp_path), PGCAST_DEMO_CONTACTS="120",
                             PGCAST_DEMO_PORT=str(free_port()))
    env.pop("PGCAST_JWT_SECRET", None)
    pid_file = tmp_path / "demo-api.pid"
    try:
        done = subprocess.run([sys.executable, "-m", "pgcast.bin.demo"], cwd=support.ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        url = re.search(r"the dashboard: open (http://127\.0\.0\.1:\d+)/ and paste", out)
        assert url is not None, out
        token = out.split("paste this token", 1)[1].splitlines()[1].strip()
        listed = httpx.get(f"{url.group(1)}/broadcasts",
                           headers={"Authorization": f"Bearer {token}"}).json()["broadcasts"]
        assert [b["status"] for b in listed] == ["sent"]
        # the CLI, with no --account, sees the same broadcast and contacts
        cli = json.loads(support.pgcast(db_url, "broadcast", "list", "--json").stdout)
        assert [b["id"] for b in cli] == [listed[0]["id"]]
        count = json.loads(support.pgcast(db_url, "contacts", "count").stdout)
        assert count["subscribed"] + count["unsubscribed"] == 120
        # the printed command mints another token that the same API accepts
        secret = (tmp_path / "demo-jwt-secret").read_text().strip()
        again = support.pgcast(db_url, "token", "--sub", "you",
                               env=support.pgcast_env(db_url, PGCAST_JWT_SECRET=secret))
        assert httpx.get(f"{url.group(1)}/broadcasts", headers={
            "Authorization": f"Bearer {again.stdout.strip()}"}).status_code == 200
    finally:
        if pid_file.exists():  # the demo leaves its API up for the curl line: stop it
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
