"""A marketing message carries one-click unsubscribe (RFC 8058) as a broadcast does (issue 26):
sent by the real worker (the message loop, file provider), its headers read from the .eml,
its link opened and POSTed on the real API app."""

from __future__ import annotations

import email
import email.policy
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcast.mail import unsubscribe
from tests.integration import test_api_helpers as h
from tests.integration import test_messages as tm

Conn = psycopg.Connection[dict[str, Any]]
ONE_CLICK = {"content": b"List-Unsubscribe=One-Click",
             "headers": {"Content-Type": "application/x-www-form-urlencoded"}}
SEND = ("SELECT pgcast_send_message(%s, %s, 'Hello', 'Hi', NULL, 'shop@example.com', NULL, "
        "%s) AS id")


@pytest.fixture
def public(db_url: str) -> Iterator[h.Api]:
    """The API app with no JWT: what a mail client's POST reaches."""
    with h.client(db_url) as c:
        yield c


def send(conn: Conn, to: str, category: str, account: str = h.ACCOUNT) -> uuid.UUID:
    row = conn.execute(SEND, (account, to, category)).fetchone()
    assert row is not None
    return uuid.UUID(str(row["id"]))


def headers(outbox: Path, mid: uuid.UUID) -> email.message.EmailMessage:
    """The sent message as its recipient's mail client reads it."""
    raw = (outbox / "messages" / f"{mid}.eml").read_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def path_of(list_unsubscribe: str) -> str:
    """The path of the one URL in a List-Unsubscribe header (`<https://...>`)."""
    assert list_unsubscribe.startswith("<") and list_unsubscribe.endswith(">"), list_unsubscribe
    url = urllib.parse.urlsplit(list_unsubscribe[1:-1])
    assert url.scheme in ("http", "https") and url.path.startswith("/u/")
    return url.path


def contact(conn: Conn, address: str, account: str = h.ACCOUNT) -> dict[str, Any] | None:
    return conn.execute("SELECT * FROM contacts WHERE account = %s AND lower(email) = %s",
                        (account, address)).fetchone()


def test_a_marketing_message_s_one_click_unsubscribes_its_contact_for_later_marketing(
        conn: Conn, db_url: str, tmp_path: Path, public: h.Api) -> None:
    conn.execute("INSERT INTO contacts (account, email) VALUES (%s, 'Ann@example.com')",
                 (h.ACCOUNT,))
    conn.execute("INSERT INTO webhook_endpoints (account, url, events, secret) "
                 "VALUES (%s, 'https://hooks.example.com/', '{contact.unsubscribed}', 's')",
                 (h.ACCOUNT,))
    ids = {c: send(conn, "ann@example.com", c)
           for c in ("marketing", "transactional", "confirmation")}
    tm.deliver(db_url, tmp_path)
    assert {c: tm.status(conn, i)["status"] for c, i in ids.items()} == dict.fromkeys(ids, "sent")
    got = headers(tmp_path, ids["marketing"])
    assert got["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = path_of(str(got["List-Unsubscribe"]))
    for other in ("transactional", "confirmation"):
        mail = headers(tmp_path, ids[other])
        assert mail["List-Unsubscribe"] is None and mail["List-Unsubscribe-Post"] is None

    # the link opens the same page as a broadcast's, and GET unsubscribes nobody
    page = public.get(link)
    assert page.status_code == 200 and "Stop receiving" in page.text
    assert contact(conn, "ann@example.com")["unsubscribed_at"] is None  # type: ignore[index]
    answer = public.post(link, **ONE_CLICK)
    assert answer.status_code == 200 and "You are unsubscribed" in answer.text
    ann = contact(conn, "ann@example.com")
    assert ann is not None and ann["unsubscribed_at"] is not None
    events = conn.execute("SELECT action, source, details, broadcast_id FROM contact_events "
                          "WHERE contact_id = %s", (ann["id"],)).fetchall()
    assert events == [{"action": "unsubscribe", "source": "message-one-click",
                       "details": {"message_id": str(ids["marketing"])}, "broadcast_id": None}]
    hooks = conn.execute("SELECT type, data->>'source' AS source FROM webhook_events").fetchall()
    assert hooks == [{"type": "contact.unsubscribed", "source": "message-one-click"}]
    # a second click changes nothing and records nothing more
    assert public.post(link, **ONE_CLICK).status_code == 200
    assert conn.execute("SELECT count(*) AS n FROM contact_events").fetchone() == {"n": 1}

    later = {c: send(conn, "ANN@example.com", c) for c in ("marketing", "transactional")}
    tm.deliver(db_url, tmp_path)
    assert (tm.status(conn, later["marketing"])["status"],
            tm.status(conn, later["marketing"])["error"]) == ("skipped", "unsubscribed")
    assert tm.status(conn, later["transactional"])["status"] == "sent"


def test_a_message_token_reaches_its_own_account_only_and_cannot_be_forged(
        conn: Conn, db_url: str, tmp_path: Path, public: h.Api) -> None:
    for account in (h.ACCOUNT, "other"):
        conn.execute("INSERT INTO contacts (account, email) VALUES (%s, 'bob@example.com')",
                     (account,))
    mid = send(conn, "bob@example.com", "marketing")
    receipt = send(conn, "bob@example.com", "transactional")
    tm.deliver(db_url, tmp_path)
    link = path_of(str(headers(tmp_path, mid)["List-Unsubscribe"]))
    token = link.removeprefix("/u/")
    secret = conn.execute("SELECT secret FROM unsubscribe_keys").fetchone()["secret"]  # type: ignore[index]
    keys = unsubscribe.Keys((secret,))

    def unsubscribed() -> dict[str, bool]:
        rows = conn.execute("SELECT account, unsubscribed_at IS NOT NULL AS u FROM contacts")
        return {r["account"]: r["u"] for r in rows.fetchall()}

    # altered, or made with another key: the invalid page, nobody unsubscribed
    forged = [token[:10] + ("A" if token[10] != "A" else "B") + token[11:],
              unsubscribe.Keys(("x" * 32,)).message(mid)]
    for bad in forged:
        answer = public.post(f"/u/{bad}", **ONE_CLICK)
        assert answer.status_code == 400 and "not valid" in answer.text
    # a transactional message's id in a well-made token: it never carried a link, nothing
    assert public.post(f"/u/{keys.message(receipt)}", **ONE_CLICK).status_code == 200
    # the preference and web-view pages read broadcast tokens only
    assert public.get(f"/p/{token}").status_code == 400
    assert unsubscribed() == {h.ACCOUNT: False, "other": False}

    assert public.post(link, **ONE_CLICK).status_code == 200
    assert unsubscribed() == {h.ACCOUNT: True, "other": False}


def test_an_address_that_is_no_contact_becomes_an_unsubscribed_one(
        conn: Conn, db_url: str, tmp_path: Path, public: h.Api) -> None:
    mid = send(conn, "cy@example.com", "marketing")
    tm.deliver(db_url, tmp_path)
    assert tm.status(conn, mid)["status"] == "sent"  # no contact: sent, with its link
    link = path_of(str(headers(tmp_path, mid)["List-Unsubscribe"]))
    assert public.post(link, **ONE_CLICK).status_code == 200
    cy = contact(conn, "cy@example.com")
    assert cy is not None and cy["unsubscribed_at"] is not None
    assert cy["confirmed_at"] is None  # it never opted in
    assert contact(conn, "cy@example.com", "other") is None
    later = send(conn, "cy@example.com", "marketing")
    tm.deliver(db_url, tmp_path)
    assert tm.status(conn, later)["status"] == "skipped"


def test_an_erased_address_is_not_brought_back_by_its_message_s_link(
        conn: Conn, db_url: str, tmp_path: Path, public: h.Api) -> None:
    conn.execute("INSERT INTO contacts (account, email) VALUES (%s, 'dee@example.com')",
                 (h.ACCOUNT,))
    mid = send(conn, "dee@example.com", "marketing")
    tm.deliver(db_url, tmp_path)
    link = path_of(str(headers(tmp_path, mid)["List-Unsubscribe"]))
    conn.execute("SELECT pgcast_erase_v6(%s, 'dee@example.com', 'test', '{}')", (h.ACCOUNT,))
    assert public.post(link, **ONE_CLICK).status_code == 200
    assert conn.execute("SELECT count(*) AS n FROM contacts").fetchone() == {"n": 0}


def test_without_a_usable_unsubscribe_link_a_marketing_message_fails_and_others_go(
        conn: Conn, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCAST_PUBLIC_URL", "ftp://nope")
    mid = send(conn, "eve@example.com", "marketing")
    receipt = send(conn, "eve@example.com", "transactional")
    tm.deliver(db_url, tmp_path)
    failed = tm.status(conn, mid)
    assert failed["status"] == "failed" and "PGCAST_PUBLIC_URL" in failed["error"]
    assert tm.status(conn, receipt)["status"] == "sent"
    assert tm.sent_files(tmp_path) == [str(receipt)]
