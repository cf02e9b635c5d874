"""Review of issues 26-30 (messages, segments, subscribers, webhooks): defects found in the
integration, each reproduced here first. The message fence for marketing mail (unconfirmed
contacts), and what an erase leaves of an address in the messages and their events."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcast.mail import unsubscribe
from pgcast.sql import contacts
from pgcast.sql.queries import QUERIES
from tests import support
from tests.integration import test_api_helpers as h
from tests.integration.test_messages import deliver, sent_files, status

Conn = psycopg.Connection[dict[str, Any]]
URLENCODED = {"Content-Type": "application/x-www-form-urlencoded"}

SEND_CAT = ("SELECT pgcast_send_message('default', %s, 'Hello', 'Hi', NULL, "
            "'shop@example.com', %s, %s) AS id")


def _send(conn: Conn, to: str, category: str, key: str | None = None) -> Any:
    row = conn.execute(SEND_CAT, (to, key, category)).fetchone()
    assert row is not None
    return row["id"]


def test_a_marketing_message_never_reaches_an_unconfirmed_contact(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    # signed up on a form, never confirmed: no marketing mail, but its confirmation and
    # transactional mail still go
    conn.execute("INSERT INTO contacts (account, email, confirmed_at) "
                 "VALUES ('default', 'ann@example.com', NULL)")
    ids = {c: _send(conn, "ann@example.com", c)
           for c in ("marketing", "transactional", "confirmation")}
    deliver(db_url, tmp_path)
    row = status(conn, ids["marketing"])
    assert row["status"] == "skipped" and row["error"] == "unconfirmed", row
    assert status(conn, ids["transactional"])["status"] == "sent"
    assert status(conn, ids["confirmation"])["status"] == "sent"
    assert str(ids["marketing"]) not in sent_files(tmp_path)


def _addressed(conn: Conn, needle: str) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT to_jsonb(m) AS m FROM messages m").fetchall()
    return [r["m"] for r in rows if needle in json.dumps(r["m"]).lower()]


def test_erase_leaves_no_trace_of_the_address_in_messages_errors_feedback_or_keys(
        conn: Conn) -> None:
    conn.execute("INSERT INTO webhook_endpoints (account, url, events, secret) "
                 "VALUES ('default', 'https://hooks.example.com/a', '{*}', 's')")
    conn.execute("INSERT INTO contacts (account, email) VALUES ('default', 'ann@example.com')")
    # an application keyed its mail by the address; SES quoted the address back
    bounced = _send(conn, "ann@example.com", "transactional", "welcome:Ann@Example.com")
    failed = _send(conn, "ann@example.com", "transactional", "reset:ann@example.com")
    flying = _send(conn, "ann@example.com", "transactional")
    token = "66666666-6666-6666-6666-666666666666"
    conn.execute("SELECT * FROM pgcast_message_claim_v1(10, %s, 'w', interval '30 s')", (token,))
    conn.execute(QUERIES["message_handoff"], {"token": token, "ids": [bounced, failed, flying]})
    conn.execute("SELECT pgcast_message_record_v2(%s, %s, %s, %s, %s, %s)",
                 (token, [bounced, failed], ["sent", "failed"], ["ses-1", None],
                  [None, "MessageRejected: Address blacklisted: ann@example.com"], [0.0, 0.0]))
    conn.execute("SELECT pgcast_message_feedback_v1('ses-1', 'bounce', now(), "
                 "'smtp; 550 5.1.1 <ann@example.com>: user unknown')")
    assert _addressed(conn, "ann@example.com")
    contacts.erase(conn, "default", "ann@example.com", source="api", actor={})
    # a record that arrives after the erase, quoting the address
    conn.execute("SELECT pgcast_message_record_v2(%s, %s, %s, %s, %s, %s)",
                 (token, [flying], ["failed"], [None],
                  ["MessageRejected: <ann@example.com> rejected"], [0.0]))
    conn.execute("SELECT pgcast_message_feedback_v1('ses-1', 'complaint', now(), "
                 "'abuse report from ann@example.com')")
    assert _addressed(conn, "ann@example.com") == []
    assert status(conn, flying)["status"] == "failed"
    events = json.dumps(conn.execute("SELECT type, data FROM webhook_events").fetchall())
    assert "message.bounced" in events and "ann@example.com" not in events.lower()
    # the keys are gone, and the same key again is a new message, skipped (erased)
    again = _send(conn, "ann@example.com", "transactional", "reset:ann@example.com")
    assert again != failed and status(conn, again)["status"] == "skipped"
    assert _addressed(conn, "ann@example.com") == []


def test_a_complaint_about_a_message_suppresses_its_contact(conn: Conn) -> None:
    # a complaint is the strongest signal there is: the next broadcast or marketing message
    # must not reach the person, whichever mail they complained about
    conn.execute("INSERT INTO contacts (account, email) VALUES ('default', 'Ann@Example.com'), "
                 "('other', 'ann@example.com')")
    mid = _send(conn, "ann@example.com", "marketing")
    token = "77777777-7777-7777-7777-777777777777"
    conn.execute("SELECT * FROM pgcast_message_claim_v1(10, %s, 'w', interval '30 s')", (token,))
    conn.execute(QUERIES["message_handoff"], {"token": token, "ids": [mid]})
    conn.execute("SELECT pgcast_message_record_v2(%s, %s, '{sent}', '{ses-7}', '{NULL}', "
                 "'{0}')", (token, [mid]))
    got = conn.execute(QUERIES["message_feedback"], {
        "provider_id": "ses-7", "event": "complaint", "at": "2026-01-01T00:00:00Z",
        "detail": "abuse"}).fetchone()
    assert got == {"id": mid}
    rows = {r["account"]: r for r in conn.execute(
        "SELECT account, suppressed_reason, unsubscribed_at FROM contacts").fetchall()}
    assert rows["default"]["suppressed_reason"] == "complaint"
    assert rows["default"]["unsubscribed_at"] is not None
    # the same address in another account is that account's business
    assert rows["other"]["suppressed_reason"] is None
    assert conn.execute("SELECT count(*) AS n FROM pgcast_segment_contacts_v1('default', "
                        "'{\"all\": []}')").fetchone() == {"n": 0}


SLOW = """CREATE FUNCTION review_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.4); RETURN NEW; END $$;
CREATE TRIGGER review_slow BEFORE UPDATE ON messages FOR EACH ROW
    EXECUTE FUNCTION review_slow()"""


def test_a_record_and_a_lease_renewal_of_one_claim_never_deadlock(
        conn: Conn, db_url: str) -> None:
    # the renewer and a group's record run at the same time on one claim's rows; each must
    # take them in id order (a deadlock aborted one: an outcome lost, or the renewer dead)
    # a table of some size, as in production, where the planner reads the claim's rows by
    # the in-flight index (lease order) in one statement and by a scan in the other
    conn.execute("INSERT INTO messages (account, status, to_address, from_address, subject, "
                 "text_body, finished_at) SELECT 'default', 'sent', 'x' || i || '@example.com', "
                 "'shop@example.com', 'S', 'T', now() FROM generate_series(1, 20000) i")
    ids = [_send(conn, f"u{i}@example.com", "transactional") for i in range(4)]
    conn.execute("ANALYZE messages")
    token = "88888888-8888-8888-8888-888888888888"
    conn.execute("SELECT * FROM pgcast_message_claim_v1(10, %s, 'w', interval '60 s')", (token,))
    conn.execute(QUERIES["message_handoff"], {"token": token, "ids": ids})
    # leases that end in the reverse of the rows' stored order (retries and renewals mix them)
    conn.execute("UPDATE messages m SET lease_expires_at = now() + interval '60 s' "
                 "- r.n * interval '1 s' FROM (SELECT id, row_number() OVER (ORDER BY ctid) AS n "
                 "FROM messages WHERE id = ANY (%s)) r WHERE m.id = r.id", (ids,))
    stored = [r["id"] for r in conn.execute(
        "SELECT id FROM messages WHERE id = ANY (%s) AND status = 'sending' ORDER BY ctid",
        (ids,)).fetchall()]
    leased = [r["id"] for r in conn.execute(
        "SELECT id FROM messages WHERE id = ANY (%s) ORDER BY lease_expires_at", (ids,)).fetchall()]
    assert leased == stored[::-1] and len(stored) == 4
    conn.execute(SLOW)  # each row's update holds its lock a while: the orders interleave
    errors: list[str] = []

    def record() -> None:
        with support.connect(db_url) as other:
            try:
                other.execute(QUERIES["message_record"], {
                    "token": token, "ids": ids, "outcomes": ["sent"] * 4,
                    "message_ids": [f"ses-{i}" for i in range(4)], "errors": [None] * 4,
                    "retry_in": [0.0] * 4})
            except psycopg.Error as exc:
                errors.append(f"record: {exc}")

    def renew() -> None:
        with support.connect(db_url) as other:
            time.sleep(0.2)
            try:
                other.execute(QUERIES["message_renew"], {"tokens": [token], "lease": 60})
            except psycopg.Error as exc:
                errors.append(f"renew: {exc}")

    threads = [threading.Thread(target=record), threading.Thread(target=renew)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    rows = conn.execute("SELECT status FROM messages WHERE id = ANY (%s)", (ids,)).fetchall()
    assert [r["status"] for r in rows] == ["sent"] * 4


def _holding(conn: Conn, needle: str) -> list[str]:
    """Every table (partitions included) with a row whose text holds `needle`."""
    tables = [r["t"] for r in conn.execute(
        "SELECT format('%I', c.relname) AS t FROM pg_class c "
        "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'").fetchall()]
    return [t for t in tables if conn.execute(
        f"SELECT EXISTS (SELECT 1 FROM {t} x WHERE strpos(lower(x::text), %s) > 0) AS e",  # type: ignore[arg-type]
        (needle,)).fetchone() == {"e": True}]


def test_after_an_erase_no_table_holds_the_address_and_nothing_brings_it_back(
        api: h.Api, conn: Conn) -> None:
    conn.execute("INSERT INTO webhook_endpoints (account, url, events, secret) "
                 "VALUES (%s, 'https://hooks.example.com/a', '{*}', 's')", (h.ACCOUNT,))
    form = api.post("/forms", json={"name": "N", "from": "news@example.com", "tags": ["news"]})
    assert form.status_code == 201
    page = f"/f/{form.json()['id']}"
    form_post = {"content": b"email=Ann%40Example.com&name=Ann", "headers": URLENCODED}
    first = api.post(page, **form_post)
    (mail,) = conn.execute("SELECT text_body FROM messages").fetchall()
    (line,) = [x for x in mail["text_body"].splitlines() if "/f/confirm/" in x]
    link = line.strip().removeprefix(unsubscribe.DEFAULT_PUBLIC_URL)
    assert api.post(link, content=b"confirm=yes", headers=URLENCODED).status_code == 200
    # the application's own mail, keyed by the address; SES's answer quoting it; the
    # receiver of the webhooks echoing what it got
    conn.execute("SELECT pgcast_send_message(%s, 'ann@example.com', 'Hi', 'Hi', NULL, "
                 "'shop@example.com', 'welcome:ann@example.com', 'marketing')", (h.ACCOUNT,))
    conn.execute("UPDATE messages SET status = 'failed', last_error = 'rejected "
                 "<ann@example.com>', feedback_detail = '550 ann@example.com'")
    # and a message to someone else that names the person: the answer of a contact form
    r = api.post("/messages", json={"to": "support@example.com", "from": "shop@example.com",
                                    "reply_to": "Ann <ann@example.com>", "subject": "Question",
                                    "text": "Hello", "idempotency_key": "form:ann@example.com"})
    assert r.status_code == 202, r.text
    conn.execute("UPDATE webhook_deliveries SET response = (SELECT e.data::text FROM "
                 "webhook_events e WHERE e.id = event_id)")
    assert "contacts" in _holding(conn, "ann@example.com")
    r = api.post("/contacts/erase", json={"email": "ann@example.com"})
    assert r.status_code == 200, r.text
    assert _holding(conn, "ann@example.com") == []
    # a sign-up, the old confirmation link and a message bring nothing back
    again = api.post(page, **form_post)
    assert (again.status_code, again.text) == (first.status_code, first.text)
    assert api.post(link, content=b"confirm=yes", headers=URLENCODED).status_code == 409
    r = api.post("/messages", json={"to": "ann@example.com", "from": "shop@example.com",
                                    "subject": "S", "text": "T",
                                    "idempotency_key": "again:ann@example.com"})
    assert r.status_code == 202 and r.json()["status"] == "skipped"
    r = api.post("/messages", json={"to": "support@example.com", "from": "shop@example.com",
                                    "reply_to": "Ann <ann@example.com>", "subject": "Again",
                                    "text": "Hello", "idempotency_key": "form2:ann@example.com"})
    assert r.status_code == 202 and r.json()["status"] == "queued"  # sent, without the reply-to
    assert _holding(conn, "ann@example.com") == []


def test_a_filter_cannot_reach_another_accounts_broadcast_or_saved_segment(
        api: h.Api, conn: Conn) -> None:
    conn.execute("INSERT INTO contacts (account, email) VALUES (%s, 'a@example.com'), "
                 "('other', 'b@example.com')", (h.ACCOUNT,))
    theirs = conn.execute("INSERT INTO broadcasts (account, subject, from_address, text_body, "
                          "status) VALUES ('other', 'S', 'o@example.com', 'T', 'sent') "
                          "RETURNING id").fetchone()["id"]  # type: ignore[index]
    conn.execute("INSERT INTO segments (account, name, filter) VALUES "
                 "('other', 'theirs', '{\"all\": []}')")
    for bad, why in (({"received": str(theirs)}, "in this account"),
                     ({"any": [{"tag": "x"}, {"bounced": str(theirs)}]}, "in this account"),
                     ({"segment": "theirs"}, "no saved segment theirs")):
        r = api.post("/segments/count", json={"filter": bad})
        assert r.status_code == 422 and why in r.text, (bad, r.text)
        r = api.post("/segments", json={"name": "mine", "filter": bad})
        assert r.status_code == 422, r.text
    assert api.get("/segments/theirs").status_code == 404
    assert api.delete("/segments/theirs").status_code == 404
    assert conn.execute("SELECT count(*) AS n FROM segments").fetchone() == {"n": 1}


SLOW_CONTACTS = """CREATE FUNCTION review_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.6); RETURN NULL; END $$;
CREATE TRIGGER review_slow AFTER UPDATE OF suppressed_at ON contacts FOR EACH ROW
    EXECUTE FUNCTION review_slow()"""


def test_a_message_handoff_over_two_accounts_and_a_bounce_never_deadlock(
        conn: Conn, db_url: str) -> None:
    # an untagged hard bounce suppresses the address in every account, taking the accounts'
    # contacts fences in the order of their lock keys (hashtext); a message claim spans
    # accounts, and its handoff must take their fences in that same order
    names = sorted((f"acct{i}" for i in range(40)), key=lambda a: conn.execute(
        "SELECT hashtext(%s) AS h", (a,)).fetchone()["h"])  # type: ignore[index]
    first, second = names[0], next(n for n in names[1:] if n < names[0])  # hash vs name order
    for acct in (first, second):
        conn.execute("INSERT INTO contacts (account, email) VALUES (%s, 'gone@example.com')",
                     (acct,))
    ids = [conn.execute("SELECT pgcast_send_message(%s, 'ann@example.com', 'S', 'T', NULL, "
                        "'shop@example.com', NULL) AS id", (acct,)).fetchone()["id"]  # type: ignore[index]
           for acct in (first, second)]
    token = "99999999-9999-9999-9999-999999999999"
    conn.execute("SELECT * FROM pgcast_message_claim_v1(10, %s, 'w', interval '60 s')", (token,))
    conn.execute(SLOW_CONTACTS)  # the bounce holds the first account's fence a while
    errors: list[str] = []
    handed: list[Any] = []

    def bounce() -> None:
        with support.connect(db_url) as other:
            try:
                other.execute(
                    "SELECT * FROM pgcast_ses_event_v2('sns-1', 'arn:t', now(), now() - "
                    "interval '1 day', 'bounce', NULL, NULL, '{gone@example.com}', "
                    "'550 user unknown', now(), 3, 100, 0.05, 0.001, 'ses-x')")
            except psycopg.Error as exc:
                errors.append(f"bounce: {exc}")

    def handoff() -> None:
        with support.connect(db_url) as other:
            time.sleep(0.3)
            try:
                handed.extend(other.execute(QUERIES["message_handoff"],
                                            {"token": token, "ids": ids}).fetchall())
            except psycopg.Error as exc:
                errors.append(f"handoff: {exc}")

    threads = [threading.Thread(target=bounce), threading.Thread(target=handoff)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(r["id"] for r in handed) == sorted(ids)
    assert conn.execute("SELECT count(*) AS n FROM contacts WHERE suppressed_reason = 'bounce'"
                        ).fetchone() == {"n": 2}


def _waiting(conn: Conn, pid: int) -> bool:
    row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                       (pid,)).fetchone()
    return row is not None and row["wait_event_type"] == "Lock"


SIGNUP = ("SELECT * FROM {}(%s, 'ann@example.com', 'Ann', 3, '{{}}', "
          "'Confirm', 'Please confirm: ann@example.com', NULL)")
ERASE = "SELECT * FROM pgcast_erase_v6('default', 'ann@example.com', 'api', '{}')"


@pytest.mark.parametrize("signup", ["pgcast_form_signup_v1", "pgcast_signup_v2"])
def test_a_sign_up_racing_an_erase_never_brings_the_address_back(
        conn: Conn, db_url: str, signup: str) -> None:
    query_signup = SIGNUP.format(signup)
    form = conn.execute("INSERT INTO forms (account, name, tags, from_address) VALUES "
                        "('default', 'N', '{news}', 'news@example.com') RETURNING id"
                        ).fetchone()["id"]  # type: ignore[index]
    for first in ("signup", "erase"):
        with support.connect(db_url) as a, support.connect(db_url) as b:
            a.autocommit = b.autocommit = False
            # the first one's transaction is open when the second one starts
            if first == "signup":
                a.execute(query_signup, (form,))
            else:
                a.execute(ERASE)
            done: list[Any] = []

            query, params = (ERASE, ()) if first == "signup" else (query_signup, (form,))

            def second(b: Conn = b, query: str = query, params: Any = params,
                       done: list[Any] = done) -> None:
                done.extend(b.execute(query, params).fetchall())  # type: ignore[arg-type]
                b.commit()

            t = threading.Thread(target=second)
            t.start()
            support.wait_for(lambda b=b: _waiting(conn, b.info.backend_pid), timeout=30)
            a.commit()
            t.join(timeout=30)
            assert not t.is_alive() and done
        assert _holding(conn, "ann@example.com") == [], first
        assert conn.execute("SELECT count(*) AS n FROM contacts").fetchone() == {"n": 0}
