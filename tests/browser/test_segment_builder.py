"""The segment builder of the new-broadcast form (issue 27), by clicking, in a real Chromium:
tags, attribute conditions, all/any and saved segments with the live count, and the draft it
makes sends to exactly those contacts."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Page, expect

from pgcast.sql import broadcasts, segments
from tests.browser import stack
from tests.browser import test_dashboard as dash

pytestmark = pytest.mark.browser
Conn = psycopg.Connection[dict[str, Any]]
A = dash.ACCOUNT
XSS = "<img src=x onerror=alert(1)>"


def _add(conn: Conn, email: str, tags: list[str], attributes: dict[str, Any]) -> None:
    conn.execute("INSERT INTO contacts (account, email, tags, attributes) "
                 "VALUES (%s, %s, %s, %s::jsonb)", (A, email, tags, json.dumps(attributes)))


def _row(page: Page, i: int) -> Any:
    return page.locator("#seg-rows .seg-row").nth(i)


def test_build_a_segment_watch_the_count_and_send_to_it(page: Page, pgcast: stack.Stack,
                                                         conn: Conn) -> None:
    for i in range(4):
        _add(conn, f"pro{i}@example.com", ["beta"], {"plan": "pro", "country": "FR"})
    _add(conn, "de@example.com", ["beta"], {"plan": "pro", "country": "DE"})
    _add(conn, "team@example.com", ["beta"], {"plan": "team", "country": "US"})
    _add(conn, "free@example.com", ["beta"], {"plan": "free"})
    _add(conn, "vip@example.com", ["vip"], {"plan": "free"})
    segments.save(conn, A, "vips", {"tag": "vip"})
    dash.sign_in(page, pgcast.base, pgcast.token())
    page.click("nav >> text=New broadcast")
    count = page.locator("#seg-count")
    expect(count).to_have_text("No condition: every contact.")
    expect(page.locator("#seg-add")).to_be_enabled()

    # beta AND plan in (pro, team) AND country != DE
    page.click("#seg-add")
    _row(page, 0).locator(".seg-tag").fill("beta")
    expect(count).to_have_text("7 contacts match now.")
    page.click("#seg-add")
    _row(page, 1).locator(".seg-kind").select_option("attribute")
    _row(page, 1).locator(".seg-attr").fill("plan")
    _row(page, 1).locator(".seg-op").select_option("in")
    _row(page, 1).locator(".seg-value").fill("pro, team")
    expect(count).to_have_text("6 contacts match now.")
    page.click("#seg-add")
    _row(page, 2).locator(".seg-kind").select_option("attribute")
    _row(page, 2).locator(".seg-attr").fill("country")
    _row(page, 2).locator(".seg-op").select_option("ne")
    _row(page, 2).locator(".seg-value").fill("DE")
    expect(count).to_have_text("5 contacts match now.")

    # a numeric comparison on text is refused, with the path, as text
    _row(page, 2).locator(".seg-op").select_option("gt")
    expect(count).to_have_text(re.compile(r"^\$\.all\[2\]\.gt: must be a number"))
    _row(page, 2).locator(".seg-op").select_option("ne")
    expect(count).to_have_text("5 contacts match now.")

    # any of: the saved segment (its name is shown as text) joins the audience
    page.click("#seg-add")
    _row(page, 3).locator(".seg-kind").select_option("segment")
    expect(_row(page, 3).locator(".seg-saved option")).to_have_count(1)
    _row(page, 3).locator(".seg-remove").click()
    expect(count).to_have_text("5 contacts match now.")
    page.select_option("#seg-match", "any")  # beta, or pro/team, or not in DE: all but none
    expect(count).to_have_text("8 contacts match now.")
    page.select_option("#seg-match", "all")
    expect(count).to_have_text("5 contacts match now.")

    page.fill("#f-subject", "Beta for paying customers")
    page.fill("#f-from", "news@acme.example")
    page.fill("#f-text", "Hello {{ unsubscribe_url }}")
    page.click("#save")
    expect(page.locator("#status [data-status]")).to_have_text("draft")
    bid = uuid.UUID(re.sub(r".*#/b/", "", page.url))
    want = {"all": [{"tag": "beta"}, {"attribute": "plan", "in": ["pro", "team"]},
                    {"attribute": "country", "ne": "DE"}]}
    assert broadcasts.get(conn, A, bid)["segment_filter"] == want
    expect(page.locator("#audience")).to_have_text("Sending now would reach 5 contacts.")
    assert broadcasts.send(conn, A, bid)["queued"] == 5
    got = sorted(r["email"] for r in conn.execute(
        "SELECT email FROM broadcast_recipients WHERE broadcast_id = %s", (bid,)))
    assert got == ["pro0@example.com", "pro1@example.com", "pro2@example.com",
                   "pro3@example.com", "team@example.com"]


def test_saved_segment_names_and_errors_are_text(page: Page, pgcast: stack.Stack,
                                                 conn: Conn) -> None:
    """A saved segment's name and an error message quoting the user's input stay text."""
    _add(conn, "vip@example.com", ["vip"], {})
    segments.save(conn, A, "vip.list", {"tag": "vip"})
    dash.sign_in(page, pgcast.base, pgcast.token())
    page.click("nav >> text=New broadcast")
    expect(page.locator("#seg-add")).to_be_enabled()
    page.click("#seg-add")
    _row(page, 0).locator(".seg-kind").select_option("segment")
    expect(_row(page, 0).locator(".seg-saved")).to_have_value("vip.list")
    expect(page.locator("#seg-count")).to_have_text("1 contact matches now.")
    _row(page, 0).locator(".seg-kind").select_option("attribute")
    _row(page, 0).locator(".seg-attr").fill("n")
    _row(page, 0).locator(".seg-op").select_option("lt")
    _row(page, 0).locator(".seg-value").fill(XSS)
    expect(page.locator("#seg-count")).to_have_text(
        re.compile(r"^\$\.all\[0\]\.lt: must be a number"))
    expect(page.locator("#segment-builder img")).to_have_count(0)
