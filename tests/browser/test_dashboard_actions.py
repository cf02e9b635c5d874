"""The dashboard's schedule, unschedule, copy and retry actions, by clicking, in a real Chromium.

Against `pgcast api`, real worker processes and, for retry, moto's SES server behind
tests.faultproxy; every wait is on the page or on database state.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
import zoneinfo
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from playwright.sync_api import Page, expect

from tests import faultproxy, support
from tests.acceptance import test_provider_faults as faults
from tests.browser import stack
from tests.browser import test_dashboard as dash

pytestmark = pytest.mark.browser
Conn = psycopg.Connection[dict[str, Any]]
# browser time zones with half-hour offsets of both signs (Newfoundland -03:30 in winter,
# India +05:30), far from the machine's UTC: a time sent without the browser's own offset, or
# with a wrong one, lands elsewhere
WEST, EAST = "America/St_Johns", "Asia/Kolkata"
WAIT = 120_000  # ms: the longest a page state may take to appear


def status(page: Page) -> Any:
    """The detail view's status badge."""
    return page.locator("#status [data-status]")


def draft(pgcast: stack.Stack, token: str, **fields: Any) -> uuid.UUID:
    """A draft made through the API; returns its id."""
    body = {"subject": "Spring sale", "from": faults.SENDER,
            "text": "Hello {{ contact.name }} {{ unsubscribe_url }}", **fields}
    r = httpx.post(f"{pgcast.base}/broadcasts", headers={"Authorization": f"Bearer {token}"},
                   json=body)
    assert r.status_code == 201, r.text
    return uuid.UUID(r.json()["id"])


def open_detail(page: Page, pgcast: stack.Stack, token: str, bid: uuid.UUID) -> None:
    """Sign in and open one broadcast's detail view."""
    dash.sign_in(page, pgcast.base, token)
    page.goto(f"{pgcast.base}/#/b/{bid}")
    expect(page.locator("#subject")).to_be_visible()


def local_field(moment: dt.datetime, zone: str) -> str:
    """A moment as a datetime-local field holds it, to the second, in that time zone."""
    return moment.astimezone(zoneinfo.ZoneInfo(zone)).strftime("%Y-%m-%dT%H:%M:%S")


def schedule_by_clicking(page: Page, zone: str, at: dt.datetime,
                         not_after: dt.datetime | None) -> None:
    """Schedule… in the detail view, with the times typed as the browser's local times."""
    page.click("[data-action=schedule]")
    field = page.locator("#dialog-fields input[name=at]")
    # prefilled with a time ahead, so a bare OK is valid
    assert field.input_value() > local_field(dt.datetime.now(dt.UTC), zone)
    field.fill(local_field(at, zone))
    if not_after is not None:
        page.fill("#dialog-fields input[name=not_after]", local_field(not_after, zone))
    page.click("#dialog-ok")


def audit(conn: Conn, bid: uuid.UUID) -> list[dict[str, Any]]:
    row = conn.execute("SELECT audit_log FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert row is not None
    return list(row["audit_log"])


@pytest.mark.parametrize("timezone", [WEST])
def test_schedule_a_draft_by_clicking_then_unschedule(page: Page, pgcast: stack.Stack,
                                                      conn: Conn, timezone: str) -> None:
    """The typed local times reach the API with the browser's offset; unschedule undoes it."""
    token = pgcast.token()
    bid = draft(pgcast, token)
    open_detail(page, pgcast, token, bid)
    expect(status(page)).to_have_text("draft")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    at, latest = now + dt.timedelta(seconds=5), now + dt.timedelta(hours=1, seconds=7)
    schedule_by_clicking(page, timezone, at, latest)
    expect(status(page)).to_have_text("scheduled")
    expect(page.locator("#notice")).to_contain_text("Scheduled for ")
    row = conn.execute("SELECT status, scheduled_at, not_after FROM broadcasts WHERE id = %s",
                       (bid,)).fetchone()
    assert row == {"status": "scheduled", "scheduled_at": at, "not_after": latest}
    # a scheduled broadcast offers unschedule, not schedule; its content is no longer a form
    expect(page.locator("[data-action=schedule]")).to_have_count(0)
    expect(page.locator("#content-form")).to_have_count(0)
    expect(page.locator("#info dt")).to_contain_text(["Scheduled", "Latest start"])

    page.click("[data-action=unschedule]")
    expect(status(page)).to_have_text("draft")
    expect(page.locator("#notice")).to_have_text("Unscheduled; back to draft")
    row = conn.execute("SELECT status, scheduled_at, not_after FROM broadcasts WHERE id = %s",
                       (bid,)).fetchone()
    assert row == {"status": "draft", "scheduled_at": None, "not_after": None}
    expect(page.locator("#info")).not_to_contain_text("Latest start")
    entries = [(e["action"], e["details"].get("via"), e["details"].get("sub"))
               for e in audit(conn, bid)]
    assert entries == [("create", "api", "tester"), ("schedule", "api", "tester"),
                       ("unschedule", "api", "tester")]
    expect(page.locator("#audit td:nth-child(2)")).to_have_text(
        ["unschedule", "schedule", "create"])
    expect(page.locator("[data-action=schedule]")).to_have_count(1)


@pytest.mark.parametrize("timezone", [EAST])
def test_a_draft_scheduled_by_clicking_starts_at_its_time_and_the_page_follows(
        page: Page, pgcast: stack.Stack, conn: Conn, timezone: str) -> None:
    """The sweeper of a real worker starts it; the open detail view shows it send to the end."""
    support.seed_contacts(conn, 20, account=dash.ACCOUNT)
    pgcast.workers(1, 1000, "--sweep-every", "1")
    token = pgcast.token()
    bid = draft(pgcast, token)
    open_detail(page, pgcast, token, bid)
    at = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=3)
    schedule_by_clicking(page, timezone, at, None)
    expect(status(page)).to_have_text("scheduled")
    expect(status(page)).to_have_text("sent", timeout=WAIT)
    expect(page.locator("#pct")).to_have_text("100%")
    row = support.assert_counters_true(conn, bid)
    assert dash.shown_counters(page) == {k: row[k] for k in dash.COUNTERS}
    assert (row["total"], row["sent"]) == (20, 20)
    assert row["started_at"] >= at
    starts = [e for e in audit(conn, bid) if e["to"] == "sending"]
    assert [(e["action"], e["from"]) for e in starts] == [("send", "scheduled")]
    expect(page.locator("#audit td:nth-child(2)")).to_have_text(
        ["finish", "send", "schedule", "create"])


def test_copy_makes_a_new_draft_with_the_same_subject(page: Page, pgcast: stack.Stack,
                                                      conn: Conn) -> None:
    """Copy opens the new draft: same subject, body and segment; the list shows both."""
    token = pgcast.token()
    subject = "Spring sale — corrected"
    bid = draft(pgcast, token, subject=subject, tag="beta")
    open_detail(page, pgcast, token, bid)
    page.click("[data-action=copy]")
    expect(page).not_to_have_url(re.compile(f"#/b/{bid}$"))
    expect(page).to_have_url(re.compile(r"#/b/[0-9a-f-]{36}$"))
    new = uuid.UUID(re.sub(r".*#/b/", "", page.url))
    expect(page.locator("#notice")).to_have_text(f"Copied into a new draft, “{subject}”.")
    expect(status(page)).to_have_text("draft")
    expect(page.locator("#subject")).to_have_text(subject)
    expect(page.locator("#f-tag")).to_have_value("beta")
    expect(page.locator("#f-text")).to_have_value("Hello {{ contact.name }} {{ unsubscribe_url }}")
    rows = conn.execute("SELECT id, status, subject, segment_tag, audit_log -> 0 -> 'details' AS d "
                        "FROM broadcasts ORDER BY created_at").fetchall()
    assert [(r["id"], r["status"], r["subject"], r["segment_tag"]) for r in rows] == [
        (bid, "draft", subject, "beta"), (new, "draft", subject, "beta")]
    assert (rows[1]["d"]["copied_from"], rows[1]["d"]["via"]) == (str(bid), "api")
    page.click("nav >> text=Broadcasts")
    expect(page.locator("#broadcasts td.subject")).to_have_text([subject] * 2)


@pytest.fixture
def proxy(ses: support.MotoServer) -> Iterator[faultproxy.FaultProxy]:
    """A fault proxy in front of this test's (emptied) SES server, no rules yet."""
    ses.verify(faults.SENDER)
    with faultproxy.running(ses.url) as p:
        yield p


def test_retry_failed_by_clicking_sends_to_the_rejected_recipients(
        page: Page, pgcast: stack.Stack, conn: Conn, procs: support.Processes,
        ses: support.MotoServer, proxy: faultproxy.FaultProxy) -> None:
    """SES rejects three recipients; once it accepts them, Retry failed… sends to them and the
    open page follows the retry to the end with broadcast_progress's numbers."""
    n = 12
    rejected = ["user2@example.com", "user5@example.com", "user9@example.com"]
    support.seed_contacts(conn, n, account=dash.ACCOUNT)
    proxy.set_rules(*(faultproxy.rejected(a) for a in rejected))
    faults.start_workers(procs, pgcast.db_url, faults.ses_env(ses, proxy), 1)
    token = pgcast.token()
    bid = draft(pgcast, token)
    assert httpx.post(f"{pgcast.base}/broadcasts/{bid}/send",
                      headers={"Authorization": f"Bearer {token}"}).status_code == 200
    support.wait_for(lambda: faults.status_is(conn, bid, "sent", "failed", "paused"),
                     timeout=WAIT / 1000, what="the first pass to finish")
    first = support.assert_counters_true(conn, bid)
    assert (first["status"], first["sent"], first["failed"]) == ("sent", n - 3, 3)

    open_detail(page, pgcast, token, bid)
    expect(status(page)).to_have_text("sent")
    expect(page.locator("#count-failed")).to_have_text("3")
    proxy.set_rules()  # SES accepts them now
    page.click("[data-action=retry]")
    expect(page.locator("#dialog-fields input[name=include_unknown]")).not_to_be_checked()
    page.click("#dialog-ok")
    expect(page.locator("#notice")).to_have_text("Retrying 3 recipients")
    expect(page.locator("#count-failed")).to_have_text("0", timeout=WAIT)
    expect(status(page)).to_have_text("sent", timeout=WAIT)
    expect(page.locator("#pct")).to_have_text("100%")
    row = support.assert_counters_true(conn, bid)
    assert (row["status"], row["sent"], row["failed"], row["total"]) == ("sent", n, 0, n)
    assert dash.shown_counters(page) == {k: row[k] for k in dash.COUNTERS}
    got = faults.delivered(ses)
    assert {a: got[a] for a in rejected} == {a: 1 for a in rejected}
    [entry] = [e["details"] for e in audit(conn, bid) if e["action"] == "retry"]
    assert (entry["requeued"], entry["include_unknown"], entry["via"]) == (3, False, "api")
    expect(page.locator("#audit td:nth-child(2)")).to_have_text(
        ["finish", "retry", "finish", "send", "create"])


def test_contacts_list_pages_by_address_filters_and_follows_edits(
        page: Page, pgcast: stack.Stack, conn: Conn) -> None:
    """GET /contacts in the Contacts view: 25 a page by address, status and tag filters, and
    the list shows an added and an unsubscribed contact at once."""
    token = pgcast.token()
    support.seed_contacts(conn, 30, account=dash.ACCOUNT, tag="beta")
    support.seed_contacts(conn, 3, account=dash.ACCOUNT, start=30)
    # as the SES feedback webhook leaves a complaint (tests/acceptance/test_feedback.py)
    conn.execute("UPDATE contacts SET suppressed_at = now(), suppressed_reason = 'complaint' "
                 "WHERE account = %s AND email = 'user0@example.com'", (dash.ACCOUNT,))
    everyone = sorted(f"user{i}@example.com" for i in range(33))
    dash.sign_in(page, pgcast.base, token)
    page.click("nav >> text=Contacts")
    emails = page.locator("#contacts td:nth-child(1)")
    expect(emails).to_have_text(everyone[:25])
    expect(page.locator("#contacts tr[data-email='user0@example.com'] td:nth-child(5)")
           ).to_have_text("suppressed (complaint)")
    expect(page.locator("#contacts-first")).to_be_disabled()
    page.click("#contacts-next")
    expect(emails).to_have_text(everyone[25:])
    expect(page.locator("#contacts-next")).to_be_disabled()
    page.click("#contacts-first")
    expect(emails).to_have_text(everyone[:25])

    # an added contact and an unsubscribe show in the list without a reload
    page.fill("#add-contact input[name=email]", "aaron@example.com")
    page.fill("#add-contact input[name=name]", "Aaron")
    page.fill("#add-contact input[name=tags]", "beta, vip")
    page.fill("#contact-attributes", "plan=pro\ncity = Oslo")
    page.click("#add-contact button")
    first = page.locator("#contacts tr").first
    expect(first.locator("td")).to_have_text(
        ["aaron@example.com", "Aaron", "beta, vip", "city=Oslo, plan=pro", "subscribed", "–",
         re.compile(".+"), "Erase"])
    assert conn.execute("SELECT attributes FROM contacts WHERE email = 'aaron@example.com'"
                        ).fetchone() == {"attributes": {"plan": "pro", "city": "Oslo"}}
    page.fill("#unsubscribe-form input[name=email]", "user1@example.com")
    page.click("#unsubscribe-form button")
    expect(page.locator("#contacts tr[data-email='user1@example.com'] [data-status]")).to_have_text(
        "unsubscribed")
    page.select_option("#contact-status", "unsubscribed")
    expect(emails).to_have_text(["user1@example.com"])
    # resubscribe from the row, asked first and recorded; then back to all statuses
    page.click("#contacts tr[data-email='user1@example.com'] [data-action=resubscribe]")
    page.click("#dialog-ok")
    expect(page.locator("#contacts td")).to_have_text(["No contacts here."])
    assert conn.execute("SELECT action, source FROM contact_events WHERE account = %s "
                        "ORDER BY id DESC LIMIT 1", (dash.ACCOUNT,)
                        ).fetchone() == {"action": "resubscribe", "source": "api"}
    page.click("#unsubscribe-form button")  # the form still holds user1: unsubscribed again
    expect(emails).to_have_text(["user1@example.com"])

    # subscribed with the tag: every page together is exactly the database's answer
    page.select_option("#contact-status", "subscribed")
    page.fill("#contact-tag", "beta")
    page.press("#contact-tag", "Enter")
    wanted = [r["email"] for r in conn.execute(
        "SELECT email FROM contacts WHERE account = %s AND 'beta' = ANY (tags) "
        "AND unsubscribed_at IS NULL AND suppressed_at IS NULL ORDER BY lower(email)",
        (dash.ACCOUNT,)).fetchall()]
    assert len(wanted) == 29  # 30 tagged, one suppressed, one unsubscribed, aaron added
    expect(emails).to_have_text(wanted[:25])
    page.click("#contacts-next")
    expect(emails).to_have_text(wanted[25:])

    # erase from the row: asked first (cancel changes nothing), then gone from the list
    row = "#contacts tr[data-email='aaron@example.com'] [data-action=erase]"
    page.click("#contacts-first")
    page.click(row)
    page.click("#dialog-cancel")
    expect(page.locator(row)).to_be_visible()
    page.click(row)
    page.click("#dialog-ok")
    expect(page.locator("#contacts tr[data-email='aaron@example.com']")).to_have_count(0)
    assert conn.execute("SELECT count(*) AS n FROM contacts WHERE email = 'aaron@example.com'"
                        ).fetchone() == {"n": 0}


def test_a_latin_1_csv_is_imported_with_the_encoding_chosen(
        page: Page, pgcast: stack.Stack, conn: Conn, tmp_path: Any) -> None:
    """The encoding choice travels as the Content-Type's charset: names keep their accents."""
    path = tmp_path / "excel.csv"
    path.write_bytes("email,name\nzoe@example.com,Zoë Ångström\n".encode("latin-1"))
    dash.sign_in(page, pgcast.base, pgcast.token())
    page.click("nav >> text=Contacts")
    page.set_input_files("#csv-file", str(path))
    page.click("#import")  # UTF-8, the default: refused, with the advice
    expect(page.locator("#error-text")).to_contain_text("charset=latin-1")
    page.select_option("#csv-encoding", "iso-8859-1")
    page.click("#import")
    expect(page.locator("#import-summary")).to_have_text("Imported 1 contacts; 0 rows rejected.")
    assert conn.execute("SELECT name FROM contacts WHERE account = %s",
                        (dash.ACCOUNT,)).fetchone() == {"name": "Zoë Ångström"}


def test_a_cancelled_broadcast_does_not_show_a_full_bar(
        page: Page, pgcast: stack.Stack, conn: Conn) -> None:
    """Cancelled recipients were never mailed: they do not count as finished."""
    token = pgcast.token()
    support.seed_contacts(conn, 10, account=dash.ACCOUNT)
    bid = draft(pgcast, token)
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.post(f"{pgcast.base}/broadcasts/{bid}/send", headers=auth).status_code == 200
    assert httpx.post(f"{pgcast.base}/broadcasts/{bid}/cancel", headers=auth).status_code == 200
    open_detail(page, pgcast, token, bid)
    expect(status(page)).to_have_text("cancelled")
    expect(page.locator("#pct")).to_have_text("0%")
    expect(page.locator("#count-cancelled")).to_have_text("10")
    assert page.locator("progress").first.get_attribute("value") == "0"


def test_the_detail_view_shows_what_ses_said_after_the_send(
        page: Page, pgcast: stack.Stack, conn: Conn) -> None:
    """Delivered, bounced and complained beside the dispatch counters (the figures come from
    SES events: tests/acceptance/test_feedback.py; here, what the page shows of them)."""
    token = pgcast.token()
    support.seed_contacts(conn, 4, account=dash.ACCOUNT)
    bid = draft(pgcast, token)
    conn.execute("UPDATE broadcasts SET status = 'sent', delivered = 3, bounced = 1, "
                 "complained = 0 WHERE id = %s", (bid,))
    open_detail(page, pgcast, token, bid)
    for k, n in (("delivered", "3"), ("bounced", "1"), ("complained", "0")):
        expect(page.locator(f"#feedback #count-{k}")).to_have_text(n)
    expect(page.locator("#feedback [data-counter=bounced]")).to_have_class("counter bad")


def test_a_subjects_merge_tags_show_as_chips_not_raw_jinja(
        page: Page, pgcast: stack.Stack, conn: Conn) -> None:
    token = pgcast.token()
    subject = "Hi {{ contact.name | default('friend', true) }}, <b>news</b> {% if 1 %}!{% endif %}"
    bid = draft(pgcast, token, subject=subject)
    open_detail(page, pgcast, token, bid)
    expect(page.locator("#subject .merge-tag")).to_have_text(["contact.name", "…", "…"])
    expect(page.locator("#subject")).to_have_text("Hi contact.name, <b>news</b> …!…")
    expect(page.locator("#subject b")).to_have_count(0)  # text, never markup
    expect(page.locator("#subject .subject-view")).to_have_attribute("title", subject)
    page.click("nav >> text=Broadcasts")
    expect(page.locator(f"tr[data-id='{bid}'] td.subject .merge-tag").first).to_have_text(
        "contact.name")
