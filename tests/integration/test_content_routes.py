"""Templates checked at create, previews, and one-click unsubscribe, through the real app."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgcast.mail import errors, message, unsubscribe
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT
ONE_CLICK = {"content": b"List-Unsubscribe=One-Click",
             "headers": {"Content-Type": "application/x-www-form-urlencoded"}}
# RFC 8058 asks mail clients for multipart/form-data
MULTIPART = {"content": b'--b0\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n'
                        b"\r\nOne-Click\r\n--b0--\r\n",
             "headers": {"Content-Type": "multipart/form-data; boundary=b0"}}


@pytest.fixture
def public(db_url: str) -> Iterator[h.Api]:
    with h.client(db_url) as c:  # no Authorization header: what a mail client sends
        yield c


def create(api: h.Api, **body: Any) -> dict[str, Any]:
    r = api.post("/broadcasts", json={"subject": "Hi {{ contact.name }}",
                                      "from": "News <news@example.com>", **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def upsert(api: h.Api, *contacts: dict[str, Any]) -> None:
    r = api.post("/contacts", json={"contacts": list(contacts)})
    assert r.status_code == 200 and r.json()["rejected"] == [], r.text


def token_for(conn: Conn, contact_id: int, bid: str, test: bool = False) -> str:
    row = conn.execute("SELECT secret FROM unsubscribe_keys").fetchone()
    assert row is not None
    return unsubscribe.Keys((row["secret"],)).make(A, contact_id, bid, test)


@pytest.mark.parametrize(("part", "source", "line", "says"), [
    ("text", "Hello\n{{ contact.name }\n", 2, "unexpected '}'"),
    ("html", "<p>{% if contact.name %}Hi</p>", 1, "endif"),
    ("text", "Hi\n\n{{ first_name }}", 3, "unknown variable 'first_name'"),
    ("subject", "Hi {{ contact.name", 1, "subject, line 1"),
    ("text", "{% for a in range(3) %}{% for b in range(3) %}{% for c in range(3) %}"
             "{% endfor %}{% endfor %}{% endfor %}", None, "loops may nest"),
])
def test_a_template_error_is_refused_at_create_with_its_line(
        api: h.Api, conn: Conn, part: str, source: str, line: int | None, says: str) -> None:
    body: dict[str, Any] = {"subject": "Hi", "from": "news@example.com", "text": "Hello"}
    body[part] = source
    r = api.post("/broadcasts", json=body)
    assert r.status_code == 422, r.text
    text = r.json()["message"]
    assert says in text and text.startswith(part)
    if line:
        assert f"line {line}" in text
    assert conn.execute("SELECT count(*) AS n FROM broadcasts").fetchone() == {"n": 0}
    # and an edit is checked the same way
    draft = create(api, text="Hello")
    r = api.patch(f"/broadcasts/{draft['id']}", json={part: source})
    assert r.status_code == 422 and says in r.json()["message"]


def test_create_warns_when_no_part_shows_the_unsubscribe_link(api: h.Api) -> None:
    without = create(api, text="Hello {{ contact.name }}")
    assert without["warnings"] == [
        "neither text nor html shows {{ unsubscribe_url }}: Gmail and Yahoo expect a visible "
        "unsubscribe link in bulk mail"]
    fixed = api.patch(f"/broadcasts/{without['id']}",
                      json={"html": '<a href="{{ unsubscribe_url }}">unsubscribe</a>'})
    assert fixed.status_code == 200 and fixed.json()["warnings"] == []


def test_preview_renders_merge_tags_and_fallbacks_per_contact(api: h.Api, conn: Conn) -> None:
    upsert(api, {"email": "ann@example.com", "name": "Ann"},
           {"email": "nameless@example.com"})
    conn.execute("UPDATE contacts SET attributes = '{\"plan\": \"pro\", \"seats\": 3}' "
                 "WHERE email = 'ann@example.com'")
    draft = create(api, text="Dear {{ contact.name | default('friend', true) }}, plan "
                             "{{ contact.attributes.plan }} x{{ contact.attributes.seats }}"
                             "{{ contact.attributes.missing }}.\n{{ unsubscribe_url }}\n",
                   html="<p>Hi {{ contact.name | default('friend', true) }} &amp; "
                        "{{ contact.email }}</p>")
    ann = api.get(f"/broadcasts/{draft['id']}/preview", params={"contact": "ann@example.com"})
    assert ann.status_code == 200, ann.text
    got = ann.json()
    assert got["subject"] == "Hi Ann"
    assert got["text"].startswith("Dear Ann, plan pro x3.\nhttp://127.0.0.1:8080/u/")
    assert got["html"] == "<p>Hi Ann &amp; ann@example.com</p>"
    assert got["headers"]["To"] == '"Ann" <ann@example.com>'
    assert got["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert got["headers"]["List-Unsubscribe"] == "<" + got["text"].split("\n")[1] + ">"
    other = api.get(f"/broadcasts/{draft['id']}/preview",
                    params={"contact": "nameless@example.com"}).json()
    assert other["subject"] == "Hi" and other["text"].startswith("Dear friend, plan  x.")
    sample = api.get(f"/broadcasts/{draft['id']}/preview").json()
    assert sample["sample"] is False and sample["contact"] == "ann@example.com"
    assert api.get(f"/broadcasts/{draft['id']}/preview",
                   params={"contact": "nobody@example.com"}).status_code == 404


def test_html_only_broadcasts_get_a_plain_text_alternative(api: h.Api) -> None:
    upsert(api, {"email": "ann@example.com", "name": "Ann"})
    draft = create(api, html='<h1>News</h1><p>Hello <b>{{ contact.name }}</b></p>'
                             '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>')
    got = api.get(f"/broadcasts/{draft['id']}/preview").json()
    assert got["text"].startswith("# News\n\nHello Ann\n\n[Unsubscribe](http://127.0.0.1")


def test_one_click_post_unsubscribes_once_and_get_never_does(
        api: h.Api, public: h.Api, conn: Conn) -> None:
    upsert(api, {"email": "bob@example.com", "name": "Bob"})
    cid = conn.execute("SELECT id FROM contacts").fetchone()["id"]  # type: ignore[index]
    bid = create(api, text="Bye: {{ unsubscribe_url }}")["id"]
    token = token_for(conn, cid, bid)
    page = public.get(f"/u/{token}")
    assert page.status_code == 200 and '<form method="post">' in page.text
    assert 'name="List-Unsubscribe" value="One-Click"' in page.text
    assert conn.execute("SELECT unsubscribed_at FROM contacts").fetchone() == {
        "unsubscribed_at": None}
    for form in (ONE_CLICK, MULTIPART):  # idempotent; both encodings RFC 8058 allows
        done = public.post(f"/u/{token}", **form)
        assert done.status_code == 200 and "You are unsubscribed" in done.text
        assert "set-cookie" not in done.headers and "location" not in done.headers
    row = conn.execute("SELECT unsubscribed_at FROM contacts").fetchone()
    assert row is not None and row["unsubscribed_at"] is not None
    events = conn.execute("SELECT account, contact_id, action, source, broadcast_id "
                          "FROM contact_events").fetchall()
    assert events == [{"account": A, "contact_id": cid, "action": "unsubscribe",
                       "source": "one-click", "broadcast_id": uuid.UUID(bid)}]
    # a later broadcast leaves the contact out
    later = create(api, text="Again {{ unsubscribe_url }}")
    sent = api.post(f"/broadcasts/{later['id']}/send")
    assert sent.json()["queued"] == 0


def test_forged_altered_and_test_tokens_unsubscribe_nobody(
        api: h.Api, public: h.Api, conn: Conn) -> None:
    upsert(api, {"email": "carol@example.com", "name": "Carol"})
    cid = conn.execute("SELECT id FROM contacts").fetchone()["id"]  # type: ignore[index]
    bid = create(api, text="{{ unsubscribe_url }}")["id"]
    good = token_for(conn, cid, bid)
    forged = unsubscribe.Keys(("another-key-of-at-least-thirty-two-bytes!",)).make(A, cid, bid)
    altered = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    for bad in (forged, altered, "x", "not-a-token-" * 5, "%00"):
        for method in ("GET", "POST"):
            r = public.request(method, f"/u/{bad}", **ONE_CLICK)
            assert r.status_code == 400 and "not valid" in r.text
            assert "carol" not in r.text.lower() and bid not in r.text
    test_token = token_for(conn, cid, bid, test=True)
    r = public.post(f"/u/{test_token}", **ONE_CLICK)
    assert r.status_code == 200 and "nobody was unsubscribed" in r.text
    assert public.post(f"/u/{good}", content=b"", headers=ONE_CLICK["headers"]).status_code == 400
    wrong = MULTIPART["content"].replace(b"One-Click", b"Two-Click")  # type: ignore[attr-defined]
    assert public.post(f"/u/{good}", content=wrong,
                       headers=MULTIPART["headers"]).status_code == 400
    row = conn.execute("SELECT unsubscribed_at FROM contacts").fetchone()
    assert row == {"unsubscribed_at": None}
    assert conn.execute("SELECT count(*) AS n FROM contact_events").fetchone() == {"n": 0}


def test_a_token_reveals_no_ids_and_rotated_keys_still_read() -> None:
    old = unsubscribe.Keys(("old-key-of-at-least-thirty-two-bytes-long",))
    bid = uuid.uuid4()
    token = old.make("acme", 123456789, bid)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert "123456789" not in token and bid.hex not in token and "acme" not in token
    rotated = unsubscribe.Keys(("new-key-of-at-least-thirty-two-bytes-long", *old.secrets))
    target = rotated.read(token)
    assert (target.account_prefix, target.contact_id, target.broadcast_id, target.test) == (
        None, 123456789, bid, False)
    assert rotated.read(rotated.make("acme", 1, bid)).contact_id == 1
    with pytest.raises(unsubscribe.InvalidToken):
        unsubscribe.Keys(("new-key-of-at-least-thirty-two-bytes-long",)).read(token)


def test_render_failure_is_that_recipients_alone() -> None:
    content = message.Content(str(uuid.uuid4()), A, "Hi", "news@example.com",
                              "{{ contact.attributes.word * contact.attributes.times }}", None)
    ok = content.render(1, "a@example.com", "A", {"word": "ab", "times": 3})
    assert ok.text == "ababab"
    with pytest.raises(errors.RenderError, match="too long"):
        content.render(2, "b@example.com", "B", {"word": "ab", "times": 10**8})
    assert content.render(3, "c@example.com", "C", {"word": "c", "times": 2}).text == "cc"


def test_test_sends_are_queued_bounded_and_capped_per_account(api: h.Api, conn: Conn) -> None:
    bid = create(api, text="Hi {{ unsubscribe_url }}")["id"]
    too_many = api.post(f"/broadcasts/{bid}/test", json={"to": [f"a{i}@example.com"
                                                                for i in range(6)]})
    assert too_many.status_code == 422 and "at most 5" in too_many.json()["message"]
    assert api.post(f"/broadcasts/{bid}/test", json={"to": ["not an address"]}).status_code == 422
    assert api.post(f"/broadcasts/{uuid.uuid4()}/test",
                    json={"to": ["a@example.com"]}).status_code == 404
    five = [f"me{i}@example.com" for i in range(5)]
    for _ in range(10):  # 50 messages: the hourly cap
        r = api.post(f"/broadcasts/{bid}/test", json={"to": five})
        assert r.status_code == 202, r.text
        assert [t["status"] for t in r.json()["test_sends"]] == ["queued"] * 5
    over = api.post(f"/broadcasts/{bid}/test", json={"to": ["one@example.com"]})
    assert over.status_code == 429 and over.json()["error"] == "too_many_test_sends"
    counts = conn.execute("SELECT count(*) AS n FROM test_sends").fetchone()
    assert counts == {"n": 50}
    jobs_left = conn.execute("SELECT count(*) AS n FROM procrastinate_jobs "
                             "WHERE task_name = 'pgcast.test_send'").fetchone()
    assert jobs_left == {"n": 10}
    row = conn.execute("SELECT status, total FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert row == {"status": "draft", "total": 0}
    ids = ",".join(str(i) for i in range(1, 4))
    listed = api.get(f"/broadcasts/{bid}/test", params={"ids": ids}).json()["test_sends"]
    assert [t["status"] for t in listed] == ["queued"] * 3
