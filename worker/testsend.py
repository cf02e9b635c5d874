"""Test sends: the procrastinate task that delivers what POST /broadcasts/{id}/test queued."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import procrastinate
import psycopg
from psycopg.rows import dict_row

from mail import message, preview
from sql import db, jobs
from sql.queries import QUERIES
from worker import providers, render

log = logging.getLogger("pgcast.testsend")

_provider: providers.Provider | None = None


def _the_provider() -> providers.Provider:
    global _provider
    if _provider is None:
        _provider = providers.from_env()
    return _provider


def register(app: procrastinate.App, url: str) -> None:
    """Add the pgcast.test_send task to a worker's procrastinate app."""

    @app.task(name=jobs.TEST_SEND, queue=jobs.QUEUE)
    async def test_send(ids: list[int]) -> None:
        await deliver(url, ids, _the_provider())

    del test_send


async def _take_token(conn: psycopg.AsyncConnection[Any]) -> None:
    """One token from the global bucket: test sends share the rate limit."""
    while True:
        cur = await conn.execute(QUERIES["take_tokens"],
                                 {"name": "global", "want": 1, "broadcast": None})
        row = await cur.fetchone()
        assert row is not None
        if row["granted"]:
            return
        await asyncio.sleep(min(1.0, max(0.005, float(row["wait_seconds"]))))


async def deliver(url: str, ids: list[int], provider: providers.Provider) -> None:
    """Render and send each queued test send once; record sent (message id) or failed."""
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
            status, message_id, error = "failed", None, None
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
                await _take_token(conn)
                if provider.blocking:
                    message_id = await asyncio.to_thread(provider.send, msg)
                else:
                    message_id = provider.send(msg)
                status = "sent"
            except Exception as exc:  # noqa: BLE001 - every fault is this test send's outcome
                error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("test send %s failed: %s", row["id"], error)
            await conn.execute(QUERIES["test_send_record"], {
                "id": row["id"], "status": status, "message_id": message_id, "error": error})
