"""Review of transactional messages (issue 26) with tracking (issue 29): a message is never
tracked, whatever its account's default mode."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path
from typing import Any

import psycopg

from tests import support

Conn = psycopg.Connection[dict[str, Any]]
BASE = "https://mail.example.org"


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
