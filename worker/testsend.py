"""Test sends: the procrastinate task that delivers what POST /broadcasts/{id}/test queued.

It renders each test message (the broadcast's content, subject prefixed `[TEST] `) and hands
it to the message path (worker.messages) as a transactional message: the caps and refusals
stay those of pgcast_test_send_v2, the delivery is the messages' (fence, priority tokens,
retries, in doubt), and test_send_status reads its outcome from the message."""

from __future__ import annotations

import json
import logging
from typing import Any

import procrastinate
import psycopg
from psycopg.rows import dict_row

from pgcast.mail import message, preview
from pgcast.sql import db, jobs
from pgcast.sql.queries import QUERIES
from pgcast.worker import render

log = logging.getLogger("pgcast.testsend")

def register(app: procrastinate.App, url: str) -> None:
    """Add the pgcast.test_send task to a worker's procrastinate app."""

    @app.task(name=jobs.TEST_SEND, queue=jobs.QUEUE)
    async def test_send(ids: list[int]) -> None:
        await deliver(url, ids)

    del test_send


KEY = "pgcast-test-send-{}"  # the message's idempotency key; test_send_status joins on it


async def _enqueue(conn: psycopg.AsyncConnection[Any], row: dict[str, Any],
                   content: message.Content, msg: render.Message) -> None:
    """The rendered test message as a transactional message (issue 26): the same fence,
    tokens (ahead of broadcasts), retries and in-doubt rules; its key names the test send,
    so a job run again never makes a second one."""
    await conn.execute(QUERIES["message_send"], {
        "account": row["account"], "to": msg.to_address, "subject": msg.subject,
        "text": msg.text, "html": msg.html, "from": content.from_source,
        "key": KEY.format(row["id"]), "category": "transactional",
        "reply_to": None, "headers": json.dumps(msg.headers), "tags": json.dumps({}),
        "notify": True})


async def deliver(url: str, ids: list[int]) -> None:
    """Render each queued test send once and queue it as a message (a worker's message loop
    sends it: the job never waits for the provider); a test send that cannot be built is
    recorded failed."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, **db.CONNECT_KWARGS,
                                                     row_factory=dict_row) as conn:
        rows = await (await conn.execute(QUERIES["test_send_start"], {"ids": ids})).fetchall()
        if not rows:
            return
        first = rows[0]
        cur = await conn.execute(QUERIES["broadcast_content"], {"id": first["broadcast_id"]})
        content_row = await cur.fetchone()
        contact = None
        if content_row is not None:
            cur = await conn.execute(QUERIES["preview_contact"], {
                "account": first["account"], "email": first["contact_email"]})
            contact = await cur.fetchone()
        for row in rows:
            try:
                if content_row is None:
                    raise LookupError("the broadcast is gone")
                if contact is None and first["contact_email"]:
                    raise LookupError(f"no contact {first['contact_email']}")
                content = message.Content.from_row(dict(content_row), test=True)
                who = dict(contact) if contact else preview.SAMPLE
                msg = await render.render_one(content, (
                    int(who["id"]), who["email"], who.get("name"), who.get("attributes"),
                    who.get("tags"), row["to_address"]))
                msg.headers["X-Pgcast-Test-Send"] = str(row["id"])
                # the row stays `sending`; its outcome is the message's (test_send_status)
                await _enqueue(conn, row, content, msg)
            except Exception as exc:  # noqa: BLE001 - every fault is this test send's outcome
                error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("test send %s failed: %s", row["id"], error)
                await conn.execute(QUERIES["test_send_record"], {
                    "id": row["id"], "status": "failed", "message_id": None, "error": error})
