"""The API's erasure-lock paths wait for a lock at most db.LOCK_WAIT, then answer 503 busy
(migration 0032's gaps). The erase here is a real one in a session of its own, left
uncommitted: it holds the account's erasure lock as an erase of a huge account does while it
runs. Without the bound, each request waited for that session's commit."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest

from pgcast.api import db
from pgcast.sql import broadcasts
from pgcast.sql.queries import QUERIES
from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT
URLENCODED = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def short_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "LOCK_WAIT", 300)  # ms: the test needs no 5 s waits


@pytest.fixture
def erasing(db_url: str, conn: Conn) -> Iterator[Conn]:
    """A session in the middle of an erase of the account: erased, not committed."""
    conn.execute("INSERT INTO contacts (account, email) VALUES (%s, 'gone@example.com')", (A,))
    with support.connect(db_url) as session:
        session.autocommit = False
        session.execute(QUERIES["contact_erase"], {"account": A, "email": "gone@example.com",
                                                   "source": "test", "actor": "{}"})
        yield session
        session.rollback()


def bounded(api: h.Api, method: str, url: str, **kw: Any) -> httpx.Response:
    """One request that must be answered within 10 s (a hang fails the test, not the run)."""

    async def run() -> httpx.Response:
        with anyio.fail_after(10):
            return await api.client.request(method, url, **kw)

    return api.portal.call(run)


def _busy(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "busy"
    assert "300 ms" in r.json()["message"]
    assert r.headers["Retry-After"] == "5"


def test_each_erasure_lock_path_answers_busy_while_an_erase_runs(
        short_wait: None, conn: Conn, api: h.Api, erasing: Conn) -> None:
    draft = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t")
    conn.execute("INSERT INTO contacts (account, email) VALUES (%s, 'bob@example.com')", (A,))
    form = api.post("/forms", json={"name": "News", "from": "news@example.com"}).json()

    def count(q: Any) -> Any:
        return conn.execute(q, (A,)).fetchone()

    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/contacts", {"json": {"contacts": [{"email": "new@example.com"}]}}),
        ("POST", "/contacts/erase", {"json": {"email": "bob@example.com"}}),
        ("POST", "/messages", {"json": {"to": "ann@example.com", "from": "shop@example.com",
                                        "subject": "Receipt", "text": "Thanks!"}}),
        ("POST", f"/broadcasts/{draft['id']}/send", {}),
        ("POST", f"/broadcasts/{draft['id']}/test", {"json": {"to": ["qa@example.com"]}}),
        ("POST", f"/f/{form['id']}", {"content": b"email=sub%40example.com",
                                      "headers": URLENCODED}),
    ]
    for method, url, kw in requests:
        _busy(bounded(api, method, url, **kw))
    # nothing was written by the refused requests
    assert count("SELECT count(*) AS n FROM contacts WHERE account = %s AND email IN "
                 "('new@example.com', 'sub@example.com')") == {"n": 0}
    assert count("SELECT count(*) AS n FROM contacts WHERE account = %s AND email = "
                 "'bob@example.com'") == {"n": 1}
    assert count("SELECT count(*) AS n FROM messages WHERE account = %s") == {"n": 0}
    assert count("SELECT count(*) AS n FROM test_sends WHERE account = %s") == {"n": 0}
    assert broadcasts.get(conn, A, draft["id"])["status"] == "draft"
    # the erase commits: the same request goes through
    erasing.commit()
    r = bounded(api, "POST", "/contacts", json={"contacts": [{"email": "new@example.com"}]})
    assert r.status_code == 200, r.text
    assert count("SELECT count(*) AS n FROM contacts WHERE account = %s AND email = "
                 "'new@example.com'") == {"n": 1}


def test_the_dashboard_import_answers_busy_while_an_erase_runs(
        short_wait: None, conn: Conn, api: h.Api, erasing: Conn) -> None:
    r = bounded(api, "POST", "/contacts/import",
                content=b"email\nnew@example.com\n", headers={"Content-Type": "text/csv"})
    _busy(r)
    assert conn.execute("SELECT count(*) AS n FROM contacts WHERE email = 'new@example.com'"
                        ).fetchone() == {"n": 0}


def test_other_requests_do_not_wait_for_the_erase(
        short_wait: None, api: h.Api, erasing: Conn) -> None:
    assert bounded(api, "GET", "/contacts").status_code == 200


def test_an_erase_waits_for_a_held_contact_at_most_the_lock_wait(
        short_wait: None, db_url: str, conn: Conn, api: h.Api) -> None:
    """pgcast_erase_v7 lets its locks go and waits again while the contact is held: the
    request's lock_timeout bounds the whole wait, not each one."""
    conn.execute("INSERT INTO contacts (account, email) VALUES (%s, 'ann@example.com')", (A,))
    with support.connect(db_url) as app:
        app.autocommit = False
        app.execute("SELECT 1 FROM contacts WHERE email = 'ann@example.com' FOR UPDATE")
        _busy(bounded(api, "POST", "/contacts/erase", json={"email": "ann@example.com"}))
        assert conn.execute("SELECT count(*) AS n FROM contact_erasures").fetchone() == {"n": 0}
        app.commit()
    r = bounded(api, "POST", "/contacts/erase", json={"email": "ann@example.com"})
    assert r.status_code == 200 and r.json()["erased"] is True, r.text
    assert conn.execute("SELECT count(*) AS n FROM contacts").fetchone() == {"n": 0}


def test_every_api_statement_that_takes_the_erasure_lock_has_its_wait_bounded(
        conn: Conn) -> None:
    """db.ERASURE_LOCKED is complete: every named statement the API runs that calls a function
    taking the erasure lock (directly or through another function) is in it."""
    takers = {r["proname"] for r in conn.execute(
        "SELECT DISTINCT proname FROM pg_proc WHERE prosrc LIKE '%%pgcast.erasure%%'")}
    while True:  # and the functions that call them
        found = {r["proname"] for r in conn.execute(
            "SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
            " AND prosrc ~ %s", ("(" + "|".join(sorted(takers)) + r")\s*\(",))}
        if found <= takers:
            break
        takers |= found
    assert {"pgcast_erase_v7", "pgcast_send_message", "pgcast_signup_v2"} <= takers
    source = "\n".join(p.read_text() for p in Path(db.__file__).parent.glob("*.py"))
    used = {name for name in QUERIES if re.search(rf'"{name}"', source)}
    locking = {name for name in used
               if any(re.search(rf"\b{t}\s*\(", QUERIES[name]) for t in takers)}
    assert locking == set(db.ERASURE_LOCKED)
