"""Issue 28's bench: a sign-up queues its confirmation without a NOTIFY in its own transaction
(a NOTIFYing commit holds a database-wide lock through its WAL flush, so sign-ups committed one
at a time); the API wakes the message loops after the commit (api/wake.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgcast.worker import control, engine, providers
from tests import support
from tests.integration import test_api_helpers as h
from tests.integration.test_messages import listening, sent_files

Conn = psycopg.Connection[dict[str, Any]]
URLENCODED = {"Content-Type": "application/x-www-form-urlencoded"}
SIGNUP_V2 = ("SELECT * FROM pgcast_signup_v2(%s, %s, 'Ann', 3, '{}', 'Confirm', "
             "'Please confirm', NULL)")


def _form(conn: Conn) -> Any:
    row = conn.execute("INSERT INTO forms (account, name, tags, from_address) VALUES "
                       "(%s, 'N', '{news}', 'news@example.com') RETURNING id",
                       (h.ACCOUNT,)).fetchone()
    assert row is not None
    return row["id"]


def test_a_sign_up_notifies_after_its_commit_never_in_it(conn: Conn, db_url: str) -> None:
    form = _form(conn)
    with support.connect(db_url) as listener, support.connect(db_url) as app:
        listener.execute("LISTEN pgcast_control")
        app.autocommit = False
        row = app.execute(SIGNUP_V2, (form, "ann@example.com")).fetchone()
        assert row is not None and row["outcome"] == "mail" and row["message_id"] is not None
        app.commit()
        assert list(listener.notifies(timeout=1.0)) == []  # v1 NOTIFYd here
        assert conn.execute("SELECT status, category FROM messages").fetchall() == [
            {"status": "queued", "category": "confirmation"}]
        # through the real app: the sign-up commits, then the NOTIFY comes
        with h.client(db_url) as public:
            r = public.post(f"/f/{form}", content=b"email=bob%40example.com",
                            headers=URLENCODED)
            assert r.status_code == 200
            notes = list(listener.notifies(timeout=10.0, stop_after=1))
            assert [n.payload for n in notes] == ['{"event" : "message"}']
            # when it arrives, the confirmation is there to be claimed
            assert conn.execute("SELECT count(*) AS n FROM messages WHERE to_address = "
                                "'bob@example.com' AND status = 'queued'").fetchone() == {"n": 1}
            # the Waker counts its wake-up once the statement has returned, just after the NOTIFY
            deadline = time.monotonic() + 10
            while public.app.state.waker.sent == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert public.app.state.waker.sent == 1
            # a sign-up that mails nothing (an existing subscriber) wakes nobody
            conn.execute("UPDATE contacts SET confirmed_at = now() WHERE email = "
                         "'bob@example.com'")
            r = public.post(f"/f/{form}", content=b"email=bob%40example.com",
                            headers=URLENCODED)
            assert r.status_code == 200
            assert list(listener.notifies(timeout=1.0)) == []
            assert public.app.state.waker.sent == 1


def test_a_sign_up_through_the_app_wakes_an_idle_worker(conn: Conn, db_url: str,
                                                        tmp_path: Path) -> None:
    """With a 60 s poll, only the wake-up after the commit brings the confirmation in time."""
    form = _form(conn)

    async def run() -> tuple[int, float]:
        async with AsyncConnectionPool(db_url, kwargs={"autocommit": True}, open=False) as pool:
            eng = engine.Engine(engine.Settings(poll=60.0), providers.FileProvider(tmp_path),
                                pool)
            eng.state.rates["global"] = 0.0
            listen = asyncio.create_task(control.listen(db_url, eng.state, eng.stopping))
            loop = asyncio.create_task(eng.messages.run())
            while not await asyncio.to_thread(listening, conn):
                await asyncio.sleep(0.01)
            while not (eng.messages.idle and not eng.state.messages.is_set()):
                await asyncio.sleep(0.01)

            def sign_up() -> None:
                with h.client(db_url) as public:
                    r = public.post(f"/f/{form}", content=b"email=cy%40example.com",
                                    headers=URLENCODED)
                    assert r.status_code == 200

            await asyncio.to_thread(sign_up)
            started = time.monotonic()
            while not sent_files(tmp_path):
                assert time.monotonic() - started < 30, "not sent: no wake-up came"
                await asyncio.sleep(0.01)
            took = time.monotonic() - started
            eng.stopping.set()
            await asyncio.gather(listen, loop)
            return eng.messages.counts.woken, took

    woken, took = asyncio.run(run())
    assert woken == 1 and took < 30
