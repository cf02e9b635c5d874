"""The dashboard in a real Chromium against `pgcast api` and real workers on a real Postgres."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from playwright.sync_api import Dialog, Page, Request, expect

from tests import support
from tests.browser import stack

pytestmark = pytest.mark.browser
Conn = psycopg.Connection[dict[str, Any]]
ACCOUNT = "acme"  # the account of stack.Stack.token()
N = 1200  # tagged contacts in the CSV
RATE = 100  # emails/s for all workers together: a send long enough to watch, pause and resume
XSS = "<img src=x onerror=alert(1)>"
WAIT = 120_000  # ms: the longest a page state may take to appear
COUNTERS = ("total", "pending", "sent", "failed", "skipped", "unknown", "cancelled")


def sign_in(page: Page, base: str, token: str) -> None:
    """Open the page, paste the token, land on the broadcast list."""
    page.goto(f"{base}/")
    expect(page.locator("#signin")).to_be_visible()
    page.fill("#token", token)
    page.click("#signin-button")
    expect(page.locator("#broadcasts")).to_be_visible()


def number(text: str) -> int:
    """'1,200' -> 1200."""
    return int(text.replace(",", ""))


def shown_counters(page: Page) -> dict[str, int]:
    """The counters the detail view shows."""
    return {k: number(page.locator(f"#count-{k}").inner_text()) for k in COUNTERS}


def write_csv(path: Path) -> Path:
    """N tagged contacts, 5 untagged, one bad address on line 3."""
    lines = ["email,name,tags", "ann@example.com,Ann Example,beta", "not-an-address,Bob,beta"]
    lines += [f"user{i}@example.com,User {i},beta;news" for i in range(N - 1)]
    lines += [f"other{i}@example.com,Other {i}," for i in range(5)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_import_create_send_watch_pause_resume(page: Page, pgcast: stack.Stack, conn: Conn,
                                              tmp_path: Path, shots: Path) -> None:
    """The whole operator path, by clicking; screenshot of the detail view mid-send."""
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))
    pgcast.workers(2, RATE)
    token = pgcast.token()
    sign_in(page, pgcast.base, token)

    # import a CSV through POST /contacts/import
    page.click("nav >> text=Contacts")
    page.set_input_files("#csv-file", str(write_csv(tmp_path / "people.csv")))
    page.click("#import")
    expect(page.locator("#import-summary")).to_have_text(
        f"Imported {N + 5:,} contacts; 1 rows rejected.")
    expect(page.locator("#import-report td").nth(0)).to_have_text("3")
    assert conn.execute("SELECT count(*) AS n FROM contacts WHERE account = %s",
                        (ACCOUNT,)).fetchone() == {"n": N + 5}

    # create a draft; the audience it would reach is shown before sending
    page.click("nav >> text=New broadcast")
    page.fill("#f-subject", "Our spring launch")
    page.fill("#f-from", "Acme News <news@acme.example>")
    page.fill("#f-text", "Hello {{ contact.name }}, we launched. {{ unsubscribe_url }}")
    page.fill("#f-tag", "beta")
    page.fill("#f-priority", "3")
    page.click("#save")
    expect(page.locator("#status [data-status]")).to_have_text("draft")
    bid = uuid.UUID(re.sub(r".*#/b/", "", page.url))
    assert conn.execute("SELECT priority FROM broadcasts WHERE id = %s",
                        (bid,)).fetchone() == {"priority": 3}
    expect(page.locator("#audience")).to_have_text(f"Sending now would reach {N:,} contacts.")

    # send: the confirmation says how many it will reach
    page.click("[data-action=send]")
    expect(page.locator("#dialog-text")).to_contain_text(f"{N:,} recipients")
    page.click("#dialog-ok")
    expect(page.locator("#status [data-status]")).to_have_text("sending")

    # mid-send: the screenshot, then pause and resume by clicking
    # (the page's CSP forbids eval, so Playwright's wait_for_function cannot run: poll here)
    support.wait_for(lambda: float(page.locator("#pct").inner_text().rstrip("%")) >= 35
                     and int(page.locator("#chart").get_attribute("data-points") or 0) >= 5,
                     timeout=WAIT / 1000, every=0.1, what="the send a third done, charted")
    # the only broadcast sending: its fair share is the whole rate
    expect(page.locator("#share")).to_have_text(f"share {RATE}/s")
    page.screenshot(path=str(shots / "dashboard.png"))
    page.click("[data-action=pause]")
    expect(page.locator("#status [data-status]")).to_have_text("paused")
    expect(page.locator("#paused-reason")).to_have_text("Paused: operator")
    assert support.progress(conn, bid)["status"] == "paused"
    page.click("[data-action=resume]")
    expect(page.locator("#status [data-status]")).to_have_text("sending")

    # the bar reaches 100% and the numbers are broadcast_progress's
    expect(page.locator("#status [data-status]")).to_have_text("sent", timeout=WAIT)
    expect(page.locator("#pct")).to_have_text("100%")
    row = support.assert_counters_true(conn, bid)
    assert shown_counters(page) == {k: row[k] for k in COUNTERS}
    assert row["sent"] == N and row["total"] == N
    progress = page.locator("#bar progress")
    assert progress.evaluate("p => [p.value, p.max]") == [N, N]
    audit = page.locator("#audit td:nth-child(2)").all_inner_texts()
    assert audit == ["finish", "resume", "pause", "send", "create"]  # newest first

    # actions follow the API's routes: a sent broadcast offers only what the API serves for it
    doc = httpx.get(f"{pgcast.base}/openapi.json",
                    headers={"Authorization": f"Bearer {token}"}).json()["paths"]
    offered = set(page.locator("#actions [data-action]").evaluate_all(
        "bs => bs.map(b => b.dataset.action)"))
    expected = {name for name, path in [("retry", "/broadcasts/{id}/retry"),
                                        ("copy", "/broadcasts/{id}/copy"),
                                        ("preview", "/broadcasts/{id}/preview")] if path in doc}
    assert offered == expected

    # the list shows it finished, with its bar full
    page.click("nav >> text=Broadcasts")
    row_el = page.locator(f"tr[data-id='{bid}']")
    expect(row_el.locator("[data-status]")).to_have_text("sent")
    expect(row_el.locator("small")).to_have_text(f"{N:,} / {N:,} · 100%")

    # the token went in the Authorization header of every data request, never in a URL
    data = [r for r in requests if not r.url.startswith(f"{pgcast.base}/static/")
            and r.url.rstrip("/") != pgcast.base]
    assert data and all(r.headers.get("authorization") == f"Bearer {token}" for r in data)
    assert not any(token in r.url for r in requests)
    assert any(r.url.endswith(f"/broadcasts/{bid}/events") for r in data)


def test_a_subject_with_markup_renders_as_text(page: Page, pgcast: stack.Stack,
                                               conn: Conn) -> None:
    """User data is inserted as text: the XSS subject is shown literally, no dialog opens."""
    dialogs: list[str] = []

    def on_dialog(d: Dialog) -> None:
        dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)
    support.seed_contacts(conn, 3, account=ACCOUNT)
    token = pgcast.token()
    r = httpx.post(f"{pgcast.base}/broadcasts", headers={"Authorization": f"Bearer {token}"},
                   json={"subject": XSS, "from": "news@example.com", "text": XSS, "tag": XSS})
    assert r.status_code == 201, r.text
    bid = r.json()["id"]
    sign_in(page, pgcast.base, token)
    link = page.locator(f"tr[data-id='{bid}'] td.subject a")
    expect(link).to_have_text(XSS)
    link.click()
    expect(page.locator("#subject")).to_have_text(XSS)
    expect(page.locator("#f-text")).to_have_value(XSS)
    page.click("[data-action=send]")
    expect(page.locator("#dialog-text")).to_contain_text(XSS)
    page.click("#dialog-cancel")
    assert page.locator("img").count() == 0
    assert page.evaluate("document.body.innerHTML.includes('<img')") is False
    assert dialogs == []


def test_an_expired_token_returns_to_sign_in(page: Page, pgcast: stack.Stack) -> None:
    """The next request after the token expires brings the sign-in back, saying it expired."""
    sign_in(page, pgcast.base, pgcast.token(ttl=4))
    # the list refreshes every few seconds; the first refresh after expiry is refused
    expect(page.locator("#signin-message")).to_contain_text("Your token expired at",
                                                            timeout=30_000)
    expect(page.locator("#signin-message")).to_contain_text("a valid bearer token is required")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_an_expired_token_ends_the_detail_view_too(page: Page, pgcast: stack.Stack) -> None:
    """The detail view makes no request of its own while it watches: the stream's `expired`
    event is what brings the sign-in back."""
    token = pgcast.token(ttl=5)
    bid = httpx.post(f"{pgcast.base}/broadcasts", headers={"Authorization": f"Bearer {token}"},
                     json={"subject": "Watched", "from": "news@example.com", "text": "x"}
                     ).json()["id"]
    sign_in(page, pgcast.base, token)
    page.goto(f"{pgcast.base}/#/b/{bid}")
    expect(page.locator("#status [data-status]")).to_have_text("draft")
    expect(page.locator("#signin-message")).to_contain_text("Your token expired at",
                                                            timeout=30_000)


def test_the_page_loads_without_a_token_and_a_bad_token_is_refused(
        page: Page, pgcast: stack.Stack) -> None:
    """No data request before sign-in; a token the API refuses is shown with the API's words."""
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    response = page.goto(f"{pgcast.base}/")
    assert response is not None and response.status == 200
    csp = response.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#signin")).to_contain_text("pgcast token --account")
    assert all(u.rstrip("/") == pgcast.base or "/static/" in u for u in requests), requests
    page.fill("#token", pgcast.token() + "x")
    page.click("#signin-button")
    expect(page.locator("#signin-message")).to_have_text(
        "Signed out: a valid bearer token is required. Paste a new token to continue.")


def test_live_progress_comes_back_after_an_api_restart(page: Page, pgcast: stack.Stack,
                                                      conn: Conn, problems: list[str]) -> None:
    """A stream that ends without `done` (the server restarted) is opened again."""
    support.seed_contacts(conn, 3, account=ACCOUNT)
    token = pgcast.token()
    auth = {"Authorization": f"Bearer {token}"}
    bid = httpx.post(f"{pgcast.base}/broadcasts", headers=auth, json={
        "subject": "Restart", "from": "news@example.com", "text": "x"}).json()["id"]
    sign_in(page, pgcast.base, token)
    page.goto(f"{pgcast.base}/#/b/{bid}")
    expect(page.locator("#status [data-status]")).to_have_text("draft")
    expect(page.locator("#count-total")).to_have_text("0")
    pgcast.restart_api()
    # no worker runs: the broadcast stays `sending`, with its snapshot counted
    assert httpx.post(f"{pgcast.base}/broadcasts/{bid}/send", headers=auth).status_code == 200
    expect(page.locator("#count-total")).to_have_text("3", timeout=WAIT)
    expect(page.locator("#status [data-status]")).to_have_text("sending")
    expect(page.locator("#error")).to_be_hidden()
    # while the API was down the page's reconnect attempts were refused: expected here
    problems[:] = [p for p in problems if "ERR_CONNECTION_REFUSED" not in p]


def test_api_errors_are_shown_as_the_api_words_them(page: Page, pgcast: stack.Stack,
                                                    shots: Path) -> None:
    """A refused edit and a refused unsubscribe show the API's own message."""
    token = pgcast.token()
    auth = {"Authorization": f"Bearer {token}"}
    bid = httpx.post(f"{pgcast.base}/broadcasts", headers=auth, json={
        "subject": "Draft", "from": "news@example.com", "text": "x"}).json()["id"]
    refused = httpx.patch(f"{pgcast.base}/broadcasts/{bid}", headers=auth,
                          json={"from": "not an address"})
    assert refused.status_code == 422
    sign_in(page, pgcast.base, token)
    page.screenshot(path=str(shots / "list.png"))
    page.goto(f"{pgcast.base}/#/b/{bid}")
    page.fill("#f-from", "not an address")
    page.click("#save")
    expect(page.locator("#error-text")).to_have_text(refused.json()["message"])
    page.click("#error-close")
    page.click("nav >> text=Contacts")
    page.fill("#unsubscribe-form input[name=email]", "nobody@example.com")
    page.click("#unsubscribe-form button")
    expect(page.locator("#error-text")).to_have_text("contact not found")
    page.screenshot(path=str(shots / "contacts.png"))


def test_preview_and_test_send_appear_with_their_routes(page: Page, pgcast: stack.Stack,
                                                       conn: Conn) -> None:
    """Actions of routes added after the page was built: shown because the API serves them."""
    token = pgcast.token()
    auth = {"Authorization": f"Bearer {token}"}
    paths = httpx.get(f"{pgcast.base}/openapi.json", headers=auth).json()["paths"]
    support.seed_contacts(conn, 1, account=ACCOUNT)
    bid = httpx.post(f"{pgcast.base}/broadcasts", headers=auth, json={
        "subject": "Hi {{ contact.name }}", "from": "news@example.com",
        "text": "Hello {{ contact.name }} {{ unsubscribe_url }}"}).json()["id"]
    sign_in(page, pgcast.base, token)
    page.goto(f"{pgcast.base}/#/b/{bid}")
    expect(page.locator("#status [data-status]")).to_have_text("draft")
    for action, path in (("preview", "/broadcasts/{id}/preview"),
                         ("test", "/broadcasts/{id}/test")):
        expect(page.locator(f"[data-action={action}]")).to_have_count(1 if path in paths else 0)
    if "/broadcasts/{id}/preview" in paths:
        page.click("[data-action=preview]")
        page.fill("#dialog-fields input[name=contact]", "user0@example.com")
        page.click("#dialog-ok")
        expect(page.locator("#dialog-text")).to_contain_text('"subject": "Hi User 0"')
        page.click("#dialog-ok")
    if "/broadcasts/{id}/test" in paths:
        page.click("[data-action=test]")
        page.fill("#dialog-fields input[name=to]", "qa@example.com")
        page.click("#dialog-ok")
        expect(page.locator("#notice")).to_have_text(
            "Test message queued for qa@example.com; a running worker sends it.")
