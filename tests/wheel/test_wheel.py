"""The wheel alone (`make test-wheel`): `python -m build` makes it (from its sdist),
`pip install` puts it in a fresh venv beside nothing else, and the installed `pgcast` migrates
a new database, sends an HTML-only broadcast with `worker --once` (render processes, package
data, the plain-text part) and serves the dashboard's files from the installed package."""

from __future__ import annotations

import email
import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests import support

TIMEOUT = 900  # seconds: the build and the install fetch from the package index


def run(cmd: list[str], transcript: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command, keep it and its output for the transcript, fail on a non-zero exit."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          timeout=600, **kw)  # type: ignore[call-overload]
    transcript.append("$ " + " ".join(cmd) + "\n" + done.stdout + done.stderr)
    assert done.returncode == 0, transcript[-1]
    return done


@pytest.fixture
def empty_db(pg_server: str) -> Iterator[str]:
    """A database with nothing in it: `pgcast migrate` starts from zero."""
    name = f"pgcast_wheel_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield support.with_dbname(pg_server, name)
    finally:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.timeout(TIMEOUT)
def test_the_wheel_installs_alone_and_runs(tmp_path: Path, empty_db: str) -> None:
    transcript: list[str] = []
    dist = tmp_path / "dist"
    # an sdist first, then the wheel from it (python -m build's default): never from a
    # build/lib left in the checkout by an earlier build, which may hold deleted modules
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(support.ROOT)], transcript)
    transcript[-1] = "\n".join(transcript[-1].splitlines()[-2:])  # the names of the files
    wheels = list(dist.glob("pgcast-*.whl"))
    assert len(wheels) == 1, transcript[-1]
    names = zipfile.ZipFile(wheels[0]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"pgcast", wheels[0].name.split("-py3")[0] + ".dist-info"}, tops
    for expected in ("pgcast/__init__.py", "pgcast/api/app.py", "pgcast/api/static/index.html",
                     "pgcast/schema/current.sql", "pgcast/schema/0001_init.sql",
                     "pgcast/sql/queries.sql", "pgcast/worker/engine.py",
                     "pgcast/mail/renderproc.py", "pgcast/bin/cli.py"):
        assert expected in names, expected

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], transcript)
    py, pgcast = str(venv / "bin" / "python"), str(venv / "bin" / "pgcast")
    run([py, "-m", "pip", "install", "--quiet", str(wheels[0])], transcript)
    installed = run([py, "-m", "pip", "list", "--format=freeze"], transcript).stdout.lower()
    for absent in ("pgserver", "html2text", "pytest", "mypy", "moto", "playwright"):
        assert f"\n{absent}==" not in "\n" + installed, absent

    home = tmp_path / "home"
    outbox = tmp_path / "outbox"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "PGCAST_HOME": str(home), "DATABASE_URL": empty_db, "PGCAST_PROVIDER": "file",
           "PGCAST_OUTBOX_DIR": str(outbox), "PGCAST_LOG_LEVEL": "WARNING"}
    elsewhere = {"cwd": str(tmp_path), "env": env}  # never the checkout, never its PYTHONPATH
    version = run([pgcast, "--version"], transcript, **elsewhere).stdout
    assert version.strip() == "pgcast 0.1.0"
    run([pgcast, "migrate"], transcript, **elsewhere)
    run([pgcast, "contacts", "add", "ann@example.com", "--name", "Ann"], transcript, **elsewhere)
    run([pgcast, "senders", "add", "default", "example.com"], transcript, **elsewhere)
    page = tmp_path / "news.html"
    page.write_text('<h1>News</h1><p>Hello {{ contact.name }}</p>'
                    '<ul><li><a href="{{ unsubscribe_url }}">Unsubscribe</a></li></ul>')
    created = run([pgcast, "broadcast", "create", "--subject", "Hi", "--from",
                   "news@example.com", "--html", str(page)], transcript, **elsewhere).stdout
    bid = created.strip()  # create prints the id alone
    run([pgcast, "broadcast", "send", bid], transcript, **elsewhere)
    run([pgcast, "worker", "--once"], transcript, **elsewhere)
    status = run([pgcast, "broadcast", "status", bid], transcript, **elsewhere).stdout
    assert '"status": "sent"' in status and '"sent": 1' in status, status
    sent = [p for p in outbox.rglob("*") if p.is_file()]
    assert len(sent) == 1, transcript
    message = email.message_from_bytes(sent[0].read_bytes())
    parts = {p.get_content_type(): p.get_payload(decode=True)
             for p in message.walk() if not p.is_multipart()}
    text = parts["text/plain"].decode().replace("\r\n", "\n")  # type: ignore[union-attr]
    assert text.startswith("# News\n\nHello Ann\n\n* [Unsubscribe](http"), text
    static = run([py, "-c", "import pgcast.api.dashboard_routes as d; "
                  "print((d.STATIC_DIR / 'index.html').is_file())"], transcript, **elsewhere)
    assert static.stdout.strip() == "True"
    top = subprocess.run([py, "-c", "import api"], capture_output=True, text=True,
                         check=False, **elsewhere)  # type: ignore[call-overload]
    assert top.returncode != 0 and "No module named 'api'" in top.stderr
    no_db = subprocess.run([pgcast, "migrate"], capture_output=True, text=True, check=False,
                           cwd=str(tmp_path), env={k: v for k, v in env.items()
                                                   if k != "DATABASE_URL"})
    transcript.append("$ pgcast migrate   # without DATABASE_URL\n" + no_db.stderr)
    assert no_db.returncode == 2 and "pgcast[embedded]" in no_db.stderr
    assert no_db.stderr.count("\n") == 1, no_db.stderr  # one line, no traceback
    (support.ROOT / "build").mkdir(exist_ok=True)
    (support.ROOT / "build" / "wheel-transcript.txt").write_text("\n".join(transcript))
