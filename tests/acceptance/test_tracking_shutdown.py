"""A real `pgcast api` stopped (SIGTERM) while it writes its buffer of clicks: every click it
answered with a redirect is recorded (issue 29; the bench once lost a batch cancelled
mid-write)."""

from __future__ import annotations

import concurrent.futures
import signal
from typing import Any

import httpx
import psycopg

from pgcast.mail import tracking, unsubscribe
from pgcast.sql import broadcasts
from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0"


def test_every_answered_click_is_recorded_across_a_shutdown(
        conn: Conn, db_url: str, procs: support.Processes) -> None:
    support.seed_contacts(conn, 3000, account=h.ACCOUNT)
    bid = broadcasts.create(conn, h.ACCOUNT, subject="Hi", from_address="news@example.com",
                            text="x", track="contact")["id"]
    urls = [f"https://example.com/{i}" for i in range(5)]
    conn.execute("SELECT * FROM pgcast_links_store_v1(%s, %s)", (bid, urls))
    secret = conn.execute("SELECT secret FROM unsubscribe_keys").fetchone()["secret"]  # type: ignore[index]
    tracker = tracking.Tracker(str(bid), "contact", tuple(urls), unsubscribe.Keys((secret,)),
                               "http://x")
    ids = [r["id"] for r in conn.execute("SELECT id FROM contacts ORDER BY id")]
    tokens = [tracker._maker(cid)(tracking.KIND_CLICK, cid % 5) for cid in ids]
    port = support.free_port()
    api = procs.start(db_url, "api", "--port", str(port), PGCAST_JWT_SECRET=h.SECRET,
                      PGCAST_LOG_LEVEL="INFO")
    base = f"http://127.0.0.1:{port}"
    support.wait_for(lambda: h.api_up(base) or api.poll() is not None, timeout=30,
                     what="pgcast api")

    def click(chunk: list[str]) -> int:
        with httpx.Client(base_url=base) as c:
            return sum(c.get(f"/c/{t}", headers={"User-Agent": CHROME}).status_code == 302
                       for t in chunk)

    def waiting() -> bool:
        row = conn.execute("SELECT count(*) AS n FROM pg_stat_activity "
                           "WHERE wait_event_type = 'Lock'").fetchone()
        return row is not None and row["n"] > 0

    # the API's write of its buffer is made to wait on a contact row we hold, so the
    # shutdown comes while a batch is being written
    with psycopg.connect(db_url) as holder:
        holder.execute("SELECT 1 FROM contacts WHERE id = %s FOR UPDATE", (ids[0],))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answered = sum(pool.map(click, [tokens[i::8] for i in range(8)]))
        assert answered == len(tokens)
        support.wait_for(waiting, timeout=30, what="the API's write to wait")
        with concurrent.futures.ThreadPoolExecutor(1) as stopper:
            # uvicorn ends a graceful shutdown by raising the signal again
            code = stopper.submit(procs.stop, api, signal.SIGTERM, 60)
            # the lifespan's end (which writes the buffer) has begun
            support.wait_for(lambda: "Waiting for application shutdown" in procs.log(api),
                             timeout=30, what="the lifespan's shutdown")
            holder.rollback()
            assert code.result() in (0, -signal.SIGTERM)
    got = conn.execute("SELECT count(*) AS n FROM tracking_events WHERE broadcast_id = %s",
                       (bid,)).fetchone()
    assert got == {"n": answered}, procs.log(api)
