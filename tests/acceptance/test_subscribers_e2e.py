"""Issue 28 end to end: real `pgcast api` and `pgcast worker` (file provider), real HTTP.

Sign up -> the confirmation mail in the outbox -> GET changes nothing -> POST confirms -> the
next broadcast to the form's tag reaches them once; /v/ shows the HTML they got; a change on
the preference page is reflected in the send after it.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import re
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests import support
from tests.integration import test_api_helpers as h

pytestmark = pytest.mark.acceptance
Conn = psycopg.Connection[dict[str, Any]]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _eml(path: Path) -> email.message.EmailMessage:
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def _part(msg: email.message.EmailMessage, kind: str) -> str:
    part = msg.get_body(preferencelist=(kind,))
    assert part is not None
    return str(part.get_content())  # type: ignore[attr-defined]


def _sent(http: httpx.Client, bid: str) -> dict[str, Any] | None:
    p = http.get(f"/broadcasts/{bid}/progress").json()
    return p if p["status"] == "sent" else None


def _broadcast(http: httpx.Client, html: str) -> str:
    r = http.post("/broadcasts", json={"subject": "Issue 1", "from": "news@example.com",
                                       "html": html, "tag": "news"})
    assert r.status_code == 201, r.text
    bid = str(r.json()["id"])
    assert http.post(f"/broadcasts/{bid}/send").status_code == 200
    support.wait_for(lambda: _sent(http, bid), timeout=60, every=0.2, what="broadcast sent")
    return bid


def test_sign_up_confirm_receive_view_and_change_preferences(
        db_url: str, conn: Conn, procs: support.Processes, tmp_path: Path) -> None:
    port = support.free_port()
    base = f"http://127.0.0.1:{port}"
    outbox = tmp_path / "outbox"
    env = {"PGCAST_JWT_SECRET": h.SECRET, "PGCAST_PUBLIC_URL": base}
    api = procs.start(db_url, "api", "--port", str(port), **env)
    support.wait_for(lambda: h.api_up(base) or api.poll() is not None, timeout=30,
                     what="pgcast api")
    assert api.poll() is None, procs.log(api)
    procs.start(db_url, "worker", PGCAST_PROVIDER="file", PGCAST_OUTBOX_DIR=str(outbox), **env)
    cli = support.pgcast_env(db_url, **env)
    made = json.loads(support.pgcast(db_url, "forms", "create", "Newsletter", "--tags", "news",
                                     "--from", "News <news@example.com>", "--account",
                                     h.ACCOUNT, env=cli).stdout)
    assert made["url"] == f"{base}/f/{made['id']}"
    support.pgcast(db_url, "topics", "add", "news", "--label", "Newsletter", "--account",
                   h.ACCOUNT, env=cli)
    token = support.pgcast(db_url, "token", "--account", h.ACCOUNT, env=cli).stdout.strip()

    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as http:
        page = http.get(f"/f/{made['id']}")
        assert page.status_code == 200 and 'name="email"' in page.text
        for who in ("reader", "lurker"):  # lurker never confirms
            r = http.post(f"/f/{made['id']}", content=f"email={who}%40example.com".encode(),
                          headers=FORM)
            assert r.status_code == 200 and "Check your inbox" in r.text

        def confirmation(who: str) -> email.message.EmailMessage | None:
            for path in (outbox / "messages").glob("*.eml"):
                msg = _eml(path)
                if str(msg["To"]) == f"{who}@example.com":
                    return msg
            return None

        mail = support.wait_for(lambda: confirmation("reader"), timeout=30,
                                what="the confirmation in the outbox")
        assert str(mail["From"]) == "News <news@example.com>"
        link = re.search(rf"{re.escape(base)}(/f/confirm/\S+)", _part(mail, "plain"))
        assert link is not None
        assert http.get(link.group(1)).status_code == 200
        state = "SELECT confirmed_at IS NOT NULL AS c, tags FROM contacts WHERE email = %s"
        assert conn.execute(state, ("reader@example.com",)).fetchone() == {"c": False,
                                                                           "tags": []}
        r = http.post(link.group(1), content=b"confirm=yes", headers=FORM)
        assert r.status_code == 200, r.text
        assert conn.execute(state, ("reader@example.com",)).fetchone() == {"c": True,
                                                                           "tags": ["news"]}

        html = ("<p>Hello {{ contact.email }}</p><a href=\"{{ web_url }}\">web</a> "
                "<a href=\"{{ preferences_url }}\">prefs</a> "
                "<a href=\"{{ unsubscribe_url }}\">unsubscribe</a>")
        first = _broadcast(http, html)
        got = sorted((outbox / first).glob("*.eml"))
        assert len(got) == 1  # the reader once; the lurker never
        assert str(_eml(got[0])["To"]) == "reader@example.com"
        assert conn.execute("SELECT count(*) AS n FROM broadcast_recipients "
                            "WHERE broadcast_id = %s", (first,)).fetchone() == {"n": 1}
        received = _part(_eml(got[0]), "html")
        web = re.search(rf'href="{re.escape(base)}(/v/[^"]+)"', received)
        prefs = re.search(rf'href="{re.escape(base)}(/p/[^"]+)"', received)
        assert web is not None and prefs is not None
        view = http.get(web.group(1))
        assert view.status_code == 200
        assert view.text.strip() == received.strip()
        assert "default-src 'none'" in view.headers["content-security-policy"]

        # the reader leaves the topic on their preference page: the next send skips them
        assert 'value="news" checked' in http.get(prefs.group(1)).text
        r = http.post(prefs.group(1), content=b"action=save", headers=FORM)
        assert r.status_code == 200
        r = http.post("/contacts", json={"contacts": [{"email": "other@example.com",
                                                       "tags": ["news"]}]})
        assert r.status_code == 200
        second = _broadcast(http, html)
        got = sorted((outbox / second).glob("*.eml"))
        assert [str(_eml(p)["To"]) for p in got] == ["other@example.com"]
        assert conn.execute(state, ("reader@example.com",)).fetchone() == {"c": True,
                                                                           "tags": []}
