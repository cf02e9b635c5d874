"""The metered engine observes the statements it runs on a real database."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgcast.worker import engine, metrics, providers
from tests import support

Conn = psycopg.Connection[dict[str, Any]]


def test_pauses_and_token_waits_are_counted(db_url: str, conn: Conn) -> None:
    support.seed_contacts(conn, 5)
    bid = support.new_broadcast(conn)
    conn.execute("UPDATE rate_limits SET rate = 1, burst = 1, tokens = 0, "
                 "refilled_at = clock_timestamp() WHERE name = 'global'")
    reg = metrics.prom.REGISTRY
    pauses = reg.get_sample_value("pgcast_pauses_total", {"reason": "error_rate"}) or 0.0
    waits = reg.get_sample_value("pgcast_token_waits_total") or 0.0

    async def run() -> None:
        async with AsyncConnectionPool(db_url, kwargs={"autocommit": True}, open=False) as pool:
            eng = metrics.MeteredEngine(engine.Settings(), providers.NullProvider(), pool)
            rows = await eng.db.q("take_tokens",
                                  {"name": "global", "want": 5, "broadcast": None,
                                   "lead": 0})
            assert rows[0][0] == 0  # an empty bucket: wait
            await eng._pause(bid, 1, "error_rate", {"threshold": 1})

    asyncio.run(run())
    assert support.progress(conn, bid)["status"] == "paused"
    assert reg.get_sample_value("pgcast_pauses_total", {"reason": "error_rate"}) == pauses + 1
    assert reg.get_sample_value("pgcast_token_waits_total") == waits + 1
