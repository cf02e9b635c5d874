"""The subscriber's pages (issue 28) in a real Chromium on a phone-sized screen: sign up,
confirm, choose topics; nothing runs, nothing loads from elsewhere, only embeddable forms frame."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect

from pgcast.mail import unsubscribe
from tests import support
from tests.browser import stack

pytestmark = pytest.mark.browser
Conn = psycopg.Connection[dict[str, Any]]
ACCOUNT = "acme"
PHONE = {"width": 375, "height": 740}


@pytest.fixture
def phone(browser: Browser) -> Iterator[tuple[Page, list[str], list[str]]]:
    """A phone-sized tab; its console errors and every URL it requested."""
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    problems: list[str] = []
    urls: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: urls.append(r.url))
    try:
        yield page, problems, urls
    finally:
        context.close()


def _form(pgcast: stack.Stack, db_url: str, *flags: str) -> dict[str, Any]:
    env = support.pgcast_env(db_url, PGCAST_PUBLIC_URL=pgcast.base)
    done = support.pgcast(db_url, "forms", "create", f"F{len(flags)}", "--tags", "news",
                          "--from", "news@example.com", "--account", ACCOUNT, *flags, env=env)
    return dict(json.loads(done.stdout))


def _fits(page: Page) -> None:
    """Readable on a phone: nothing wider than the screen."""
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.evaluate("getComputedStyle(document.body).fontSize") == "16px"


def test_sign_up_and_confirm_on_a_phone(pgcast: stack.Stack, db_url: str, conn: Conn,
                                        phone: tuple[Page, list[str], list[str]]) -> None:
    page, problems, urls = phone
    form = _form(pgcast, db_url)
    page.goto(form["url"])
    _fits(page)
    email = page.get_by_label("Email address")
    expect(email).to_be_visible()
    expect(page.get_by_label("Name (optional)")).to_be_visible()
    # the honeypot is off screen and out of the tab order
    trap = page.locator("#website")
    box = trap.bounding_box()
    assert box is not None and box["x"] + box["width"] <= 0
    assert trap.get_attribute("tabindex") == "-1"
    email.fill("reader@example.com")
    page.get_by_label("Name (optional)").fill("Reader <b>")
    page.get_by_role("button", name="Subscribe").click()
    expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()
    _fits(page)
    row = conn.execute("SELECT name, confirmed_at FROM contacts").fetchone()
    assert row == {"name": "Reader <b>", "confirmed_at": None}
    text = conn.execute("SELECT text_body FROM messages").fetchone()["text_body"]  # type: ignore[index]
    link = re.search(r"http\S+(/f/confirm/\S+)", text)  # the stack has no PGCAST_PUBLIC_URL
    assert link is not None
    page.goto(pgcast.base + link.group(1))
    expect(page.get_by_role("heading", name="Confirm your subscription")).to_be_visible()
    assert conn.execute("SELECT confirmed_at FROM contacts").fetchone() == {"confirmed_at": None}
    page.get_by_role("button", name="Confirm").click()
    expect(page.get_by_role("heading", name="You are subscribed")).to_be_visible()
    row = conn.execute("SELECT tags, confirmed_at IS NOT NULL AS c FROM contacts").fetchone()
    assert row == {"tags": ["news"], "c": True}
    assert problems == []
    assert all(u.startswith(pgcast.base) for u in urls), urls


def test_preferences_on_a_phone(pgcast: stack.Stack, db_url: str, conn: Conn,
                                phone: tuple[Page, list[str], list[str]]) -> None:
    page, problems, urls = phone
    env = support.pgcast_env(db_url)
    for tag, label in (("product", "Product news"), ("events", "Events near you")):
        support.pgcast(db_url, "topics", "add", tag, "--label", label, "--account", ACCOUNT,
                       env=env)
    cid = conn.execute("INSERT INTO contacts (account, email, tags) VALUES (%s, %s, %s) "
                       "RETURNING id", (ACCOUNT, "p@example.com", ["product"])
                       ).fetchone()["id"]  # type: ignore[index]
    secret = conn.execute("SELECT secret FROM unsubscribe_keys").fetchone()["secret"]  # type: ignore[index]
    token = unsubscribe.Keys((secret,)).make(ACCOUNT, cid, "00000000-0000-0000-0000-000000000001")
    page.goto(f"{pgcast.base}/p/{token}")
    _fits(page)
    product, events = page.get_by_label("Product news"), page.get_by_label("Events near you")
    expect(product).to_be_checked()
    expect(events).not_to_be_checked()
    product.uncheck()
    events.check()
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("status")).to_have_text("Your preferences are saved.")
    expect(page.get_by_label("Events near you")).to_be_checked()
    assert conn.execute("SELECT tags FROM contacts").fetchone() == {"tags": ["events"]}
    page.get_by_role("button", name="Unsubscribe from everything").click()
    expect(page.get_by_role("status")).to_have_text("You are unsubscribed from everything.")
    assert conn.execute("SELECT unsubscribed_at IS NOT NULL AS u FROM contacts"
                        ).fetchone() == {"u": True}
    assert problems == []
    assert all(u.startswith(pgcast.base) for u in urls), urls


@contextlib.contextmanager
def _other_site(root: Path) -> Iterator[str]:
    """Another origin (a local static server) whose page frames ours."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", support.free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_only_an_embeddable_form_shows_in_another_sites_frame(
        pgcast: stack.Stack, db_url: str, tmp_path: Path,
        phone: tuple[Page, list[str], list[str]]) -> None:
    page, problems, _ = phone
    framed = _form(pgcast, db_url, "--embeddable")
    closed = _form(pgcast, db_url)
    (tmp_path / "embed.html").write_text(
        f'<!doctype html><iframe id="a" src="{framed["url"]}"></iframe>'
        f'<iframe id="b" src="{closed["url"]}"></iframe>')
    with _other_site(tmp_path) as site:
        page.goto(f"{site}/embed.html")
        inner = page.frame_locator("#a")
        expect(inner.get_by_label("Email address")).to_be_visible()
        expect(page.frame_locator("#b").get_by_label("Email address")).to_have_count(0)
    assert any("frame-ancestors" in p for p in problems), problems
