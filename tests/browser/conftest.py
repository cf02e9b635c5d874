"""Fixtures of the browser ring: Debian's Chromium under Playwright, and a real pgcast stack."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests import support
from tests.browser import stack

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own download is never used
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 1000}
API_ANSWER = "the server responded with a status of"


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    """Playwright's driver for the session."""
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """One headless Chromium for the session."""
    b = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def problems() -> list[str]:
    """The page's errors and console errors (a test may remove ones it caused on purpose)."""
    return []


@pytest.fixture
def timezone() -> str | None:
    """The browser's time zone (None: the machine's); a test parametrizes it to pin another."""
    return None


@pytest.fixture
def page(browser: Browser, problems: list[str], timezone: str | None) -> Iterator[Page]:
    """A fresh tab in its own context (its own sessionStorage); fails on any page error."""
    context = browser.new_context(viewport=VIEWPORT, timezone_id=timezone)
    p = context.new_page()
    p.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # a CSP violation or a failed script shows up as a console error; an API answer of 4xx
    # is logged by Chromium too, but it is the page's to show (tests check it does)
    p.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
         if m.type == "error" and API_ANSWER not in m.text else None)
    try:
        yield p
        seen = list(problems)  # closing the tab cuts open event streams: not the page's fault
    finally:
        context.close()
    assert not seen, seen


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: a temporary directory, or PGCAST_SCREENSHOT_DIR (make screenshot)."""
    where = os.environ.get("PGCAST_SCREENSHOT_DIR")
    return Path(where) if where else tmp_path


@pytest.fixture
def pgcast(db_url: str, procs: support.Processes) -> stack.Stack:
    """`pgcast api` on a free port of this test's database (workers started by the test)."""
    return stack.Stack(db_url, procs)
