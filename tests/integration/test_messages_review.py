"""Review of transactional messages (issue 26) with tracking (issue 29): a message is never
tracked, whatever its account's default mode."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests import snsmessages as m
from tests import support
from tests.integration import test_api_helpers as h
from tests.integration.test_feedback_webhook import Hook, feedback

Conn = psycopg.Connection[dict[str, Any]]
BASE = "https://mail.example.org"


@pytest.fixture
def webhook(db_url: str) -> Iterator[Hook]:
    """The app taking signed SNS messages (tests.snsmessages' certificate)."""
    fetcher = m.Fetcher()
    with h.client(db_url) as api:
        api.app.state.feedback = feedback(fetcher)
        yield Hook(api, fetcher)


def test_a_message_s_links_are_never_rewritten_nor_given_an_open_image(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    conn.execute("INSERT INTO tracking_defaults (account, mode) VALUES ('acme', 'contact')")
    html = ('<html><body><a href="https://shop.example.com/reset?t=1&amp;u=2">Reset</a>'
            "</body></html>")
    for category in ("transactional", "marketing", "confirmation"):
        conn.execute("SELECT pgcast_send_message('acme', %s, 'Reset', %s, %s, "
                     "'shop@example.com', NULL, %s)",
                     (f"{category}@example.com", "Go to https://shop.example.com/reset?t=1",
                      html, category))
    outbox = tmp_path / "outbox"
    support.pgcast(db_url, "worker", "--once", env=support.pgcast_env(
        db_url, PGCAST_PROVIDER="file", PGCAST_OUTBOX_DIR=str(outbox), PGCAST_PUBLIC_URL=BASE))
    ids = [r["id"] for r in conn.execute("SELECT id FROM messages WHERE status = 'sent'")]
    assert len(ids) == 3
    for mid in ids:
        parsed = email.message_from_bytes((outbox / "messages" / f"{mid}.eml").read_bytes(),
                                          policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        body = parsed.get_body(preferencelist=("html",))
        text = parsed.get_body(preferencelist=("plain",))
        assert body is not None and text is not None
        assert str(body.get_content()).rstrip() == html  # type: ignore[attr-defined]
        assert "https://shop.example.com/reset?t=1" in str(text.get_content())  # type: ignore[attr-defined]
        assert BASE not in parsed.as_string()
    assert conn.execute("SELECT count(*) AS n FROM broadcast_links").fetchone() == {"n": 0}


def test_an_unknown_message_is_resolved_by_an_ses_event_tagged_with_its_id(
        conn: Conn, webhook: Hook) -> None:
    # `unknown` is a lost answer: pgcast never learned SES's message id, so an event "for its
    # provider id" could never find it. Every message carries the EmailTag pgcast_message.
    def message(to: str) -> Any:
        return conn.execute("SELECT pgcast_send_message('acme', %s, 'S', 'T', NULL, "
                            "'shop@example.com', NULL) AS id", (to,)).fetchone()["id"]  # type: ignore[index]

    lost, sent = message("ann@example.com"), message("bob@example.com")
    conn.execute("UPDATE messages SET status = 'unknown', worker = 'w' WHERE id = %s", (lost,))
    conn.execute("UPDATE messages SET status = 'sent', provider_message_id = 'ses-a', "
                 "worker = 'w' WHERE id = %s", (sent,))
    for mid, ses_id in ((lost, "ses-lost"), (sent, "ses-b")):
        event = m.ses_event("Delivery", "x@example.com")
        event["mail"]["messageId"] = ses_id
        event["mail"]["tags"] = {"pgcast_message": [str(mid)]}
        r = webhook.post(m.notification(event))
        assert r.status_code == 200, r.text
    assert r.json().get("message") is None  # another SES id than the one it was sent as
    rows = {r["id"]: r for r in conn.execute("SELECT * FROM message_status")}
    assert (rows[lost]["status"], rows[lost]["provider_message_id"]) == ("sent", "ses-lost")
    assert rows[lost]["delivered_at"] is not None
    assert (rows[sent]["provider_message_id"], rows[sent]["delivered_at"]) == ("ses-a", None)
