"""Test sends: the procrastinate task that delivers what POST /broadcasts/{id}/test queued.

It renders each test message (the broadcast's content, subject prefixed `[TEST] `) and hands
it to the message path (worker.messages) as a transactional message: the caps and refusals
stay those of pgcast_test_send_v2, the delivery is the messages' (fence, priority tokens,
retries, in doubt), and the outcome is copied back to the test_sends row."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import procrastinate
import psycopg
from psycopg.rows import dict_row

from mail import message, preview
from sql import db, jobs
from sql.queries import QUERIES
from worker import render

log = logging.getLogger("pgcast.testsend")

def register(app: procrastinate.App, url: str) -> None:
    """Add the pgcast.test_send task to a worker's procrastinate app."""

    @app.task(name=jobs.TEST_SEND, queue=jobs.QUEUE)
    async def test_send(ids: list[int]) -> None:
        await deliver(url, ids)

    del test_send


WAIT_EVERY = 0.05  # seconds between looks at a test message's outcome
WAIT_MOST = 300.0  # seconds: the longest a job waits for one (the message is sent regardless)
ENDED = ("sent", "failed", "unknown", "skipped")


async def _enqueue(conn: psycopg.AsyncConnection[Any], row: dict[str, Any],
                   content: message.Content, msg: render.Message) -> uuid.UUID:
    """The rendered test message as a transactional message (issue 26): the same fence,
    tokens (ahead of broadcasts), retries and in-doubt rules; its key names the test send,
    so a job run again never makes a second one."""
    cur = await conn.execute(QUERIES["message_send"], {
        "account": row["account"], "to": msg.to_address, "subject": msg.subject,
        "text": msg.text, "html": msg.html, "from": content.from_source,
        "key": f"pgcast-test-send-{row['id']}", "category": "transactional",
        "reply_to": None, "headers": json.dumps(msg.headers), "tags": json.dumps({})})
    made = await cur.fetchone()
    assert made is not None
    return uuid.UUID(str(made["id"]))


async def _outcome(conn: psycopg.AsyncConnection[Any],
                   mid: uuid.UUID) -> tuple[str, str | None, str | None]:
    """Wait for the message's outcome: (test send status, provider message id, error)."""
    waited = 0.0
    while waited < WAIT_MOST:
        cur = await conn.execute(QUERIES["message_get_any"], {"id": mid})
        got = await cur.fetchone()
        if got is not None and got["status"] in ENDED:
            if got["status"] == "sent":
                return "sent", got["provider_message_id"], None
            why = got["error"] or got["status"]
            return "failed", got["provider_message_id"], f"{got['status']}: {why}"[:500]
        await asyncio.sleep(WAIT_EVERY)
        waited += WAIT_EVERY
    return "failed", None, f"no outcome within {WAIT_MOST:g}s (message {mid})"


async def deliver(url: str, ids: list[int]) -> None:
    """Render each queued test send once and send it as a message (a worker's message loop
    sends it); record sent (the provider's message id) or failed."""
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
        queued: list[tuple[dict[str, Any], uuid.UUID]] = []
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
                queued.append((row, await _enqueue(conn, row, content, msg)))
            except Exception as exc:  # noqa: BLE001 - every fault is this test send's outcome
                error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("test send %s failed: %s", row["id"], error)
                await conn.execute(QUERIES["test_send_record"], {
                    "id": row["id"], "status": "failed", "message_id": None, "error": error})
        for row, mid in queued:
            status, message_id, why = await _outcome(conn, mid)
            await conn.execute(QUERIES["test_send_record"], {
                "id": row["id"], "status": status, "message_id": message_id, "error": why})
