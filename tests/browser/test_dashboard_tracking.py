"""The detail view's opens and clicks: counters, the hourly chart and the per-link table, in a
real Chromium against a real `pgcast api` that redirected real clicks (issue 29)."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from playwright.sync_api import Page, expect

from pgcast.sql import broadcasts
from tests import support
from tests.browser import stack
from tests.browser.test_dashboard import sign_in

pytestmark = pytest.mark.browser
Conn = psycopg.Connection[dict[str, Any]]
ACCOUNT = "acme"
HOSTILE = "https://example.com/?q=<img src=x onerror=alert(1)>"
HTML = ('<p><a href="https://example.com/spring?utm=1&amp;x=2#top">Spring</a> '
        f'<a href="{HOSTILE.replace("<", "&lt;").replace(">", "&gt;")}">odd</a> '
        '<a href="{{ unsubscribe_url }}">Unsubscribe</a></p>')
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")


def test_the_detail_view_shows_opens_clicks_and_each_link(
        page: Page, pgcast: stack.Stack, conn: Conn, tmp_path: Path) -> None:
    conn.execute("INSERT INTO contacts (account, email, name) VALUES (%s, 'ann@example.com', "
                 "'Ann'), (%s, 'bob@example.com', 'Bob')", (ACCOUNT, ACCOUNT))
    bid = broadcasts.create(conn, ACCOUNT, subject="Spring", from_address="news@example.com",
                            html=HTML, track="contact")["id"]
    broadcasts.send(conn, ACCOUNT, bid)
    outbox = tmp_path / "outbox"
    support.pgcast(pgcast.db_url, "worker", "--once", env=support.pgcast_env(
        pgcast.db_url, PGCAST_PROVIDER="file", PGCAST_OUTBOX_DIR=str(outbox),
        PGCAST_PUBLIC_URL=pgcast.base))
    clicks = opens = 0
    for eml in sorted((outbox / str(bid)).glob("*.eml")):
        parsed = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        body = parsed.get_body(preferencelist=("html",))  # type: ignore[attr-defined]
        html = str(body.get_content())
        for token in re.findall(re.escape(pgcast.base) + r"/c/([A-Za-z0-9_-]+)", html)[:1]:
            r = httpx.get(f"{pgcast.base}/c/{token}", headers={"User-Agent": CHROME})
            assert r.status_code == 302 and r.headers["location"].startswith(
                "https://example.com/spring?utm=1&x=2#top")
            clicks += 1
        for token in re.findall(re.escape(pgcast.base) + r"/o/([A-Za-z0-9_-]+)", html):
            assert httpx.get(f"{pgcast.base}/o/{token}").status_code == 200
            opens += 1
    assert (clicks, opens) == (2, 2)
    auth = {"Authorization": f"Bearer {pgcast.token()}"}

    def stats() -> dict[str, Any]:
        return dict(httpx.get(f"{pgcast.base}/broadcasts/{bid}/stats", headers=auth).json())

    support.wait_for(lambda: stats()["clicks"]["total"] == 2 and stats()["opens"]["total"] == 2,
                     timeout=30, what="the events written")
    want = stats()
    sign_in(page, pgcast.base, pgcast.token())
    page.goto(f"{pgcast.base}/#/b/{bid}")
    expect(page.locator("#tracking")).to_be_visible()
    expect(page.locator("#track-mode")).to_have_text("(contact)")
    for kind in ("opens", "clicks"):
        for which in ("human", "machine"):
            expect(page.locator(f"#stat-{kind}-{which}")).to_have_text(str(want[kind][which]))
    # no User-Agent on the opens: machine; the clicks came seconds after the send: machine
    expect(page.locator("#stat-opens-machine")).to_have_text("2")
    rows = page.locator("#tracking-links tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator("td").nth(0)).to_have_text("https://example.com/spring?utm=1&x=2#top")
    expect(rows.nth(0).locator("td").nth(1)).to_have_text("2")
    # a URL is text, never markup
    expect(rows.nth(1).locator("td").nth(0)).to_have_text(HOSTILE)
    assert page.locator("#tracking img").count() == 0
    assert int(page.locator("#tracking-chart").get_attribute("data-points") or 0) >= 2
