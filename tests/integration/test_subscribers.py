"""Issue 28: unconfirmed contacts are in no audience; forms, topics and their public pages."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgcast.mail import unsubscribe
from pgcast.sql import broadcasts, contacts
from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
URLENCODED = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def public(db_url: str) -> Iterator[h.Api]:
    with h.client(db_url) as c:
        yield c


def _csp(value: str) -> dict[str, str]:
    return {d.split()[0]: d.strip() for d in value.split(";") if d.strip()}


def _add(conn: Conn, email: str, *, account: str = h.ACCOUNT, confirmed: bool = True,
         tags: tuple[str, ...] = ()) -> int:
    row = conn.execute(
        "INSERT INTO contacts (account, email, tags, confirmed_at) "
        "VALUES (%s, %s, %s, CASE WHEN %s THEN now() END) RETURNING id",
        (account, email, list(tags), confirmed)).fetchone()
    assert row is not None
    return int(row["id"])


def test_an_unconfirmed_contact_is_in_no_snapshot_and_counted_apart(conn: Conn) -> None:
    _add(conn, "yes@example.com", tags=("news",))
    _add(conn, "pending@example.com", confirmed=False, tags=("news",))
    # what imports and API adds write: confirmed, as every contact before 0019
    contacts.upsert(conn, h.ACCOUNT, [{"email": "imported@example.com", "name": "",
                                       "tags": ["news"], "attributes": {}}])
    for tag in (None, "news"):
        bid = support.new_broadcast(conn, account=h.ACCOUNT, tag=tag, send=False)
        assert broadcasts.send(conn, h.ACCOUNT, bid)["queued"] == 2
        emails = {r["email"] for r in conn.execute(
            "SELECT email FROM broadcast_recipients WHERE broadcast_id = %s", (bid,))}
        assert emails == {"yes@example.com", "imported@example.com"}
    counted = contacts.count(conn, h.ACCOUNT)
    assert (counted["total"], counted["subscribed"], counted["unconfirmed"]) == (3, 2, 1)
    listed = contacts.page(conn, h.ACCOUNT, status="unconfirmed")
    assert [r["email"] for r in listed] == ["pending@example.com"]
    assert contacts.status_of(listed[0]) == "unconfirmed"


@pytest.mark.parametrize("path", ["handoff", "claim_handoff"])
def test_both_handoffs_skip_a_contact_unconfirmed_after_the_snapshot(conn: Conn,
                                                                     path: str) -> None:
    keep = _add(conn, "keep@example.com")
    gone = _add(conn, "gone@example.com")
    bid = support.new_broadcast(conn, account=h.ACCOUNT, send=False)
    assert broadcasts.send(conn, h.ACCOUNT, bid)["queued"] == 2
    conn.execute("UPDATE contacts SET confirmed_at = NULL WHERE id = %s", (gone,))
    token = uuid.uuid4()
    if path == "handoff":
        claimed = conn.execute("SELECT contact_id, epoch FROM pgcast_claim_v3(%s, 10, %s, 'w', "
                               "interval '30 seconds', 0)", (bid, token)).fetchall()
        handed = conn.execute("SELECT contact_id FROM pgcast_handoff_v4(%s, %s, %s, %s, true)", (
            bid, claimed[0]["epoch"], token, [r["contact_id"] for r in claimed])).fetchall()
        assert [r["contact_id"] for r in handed] == [keep]
    else:
        rows = conn.execute("SELECT contact_id, handed FROM pgcast_claim_handoff_v6(%s, 10, %s, "
                            "'w', interval '30 seconds', 0, false)", (bid, token)).fetchall()
        assert {r["contact_id"]: r["handed"] for r in rows} == {keep: True, gone: False}
        epoch = conn.execute("SELECT epoch FROM broadcasts WHERE id = %s",
                             (bid,)).fetchone()["epoch"]  # type: ignore[index]
        assert conn.execute("SELECT count(*) AS n FROM pgcast_handoff_v4(%s, %s, %s, %s, false)", (
            bid, epoch, token, [gone])).fetchone() == {"n": 0}
    row = conn.execute("SELECT status, last_error FROM broadcast_recipients "
                       "WHERE broadcast_id = %s AND contact_id = %s", (bid, gone)).fetchone()
    assert row == {"status": "skipped", "last_error": "unconfirmed"}
    assert support.assert_counters_true(conn, bid)["skipped"] == 1


def test_a_confirmation_takes_the_contacts_fence(db_url: str, conn: Conn) -> None:
    cid = _add(conn, "wait@example.com", confirmed=False)
    with support.connect(db_url) as holder, holder.transaction():
        # what a handoff holds while it reads the contacts
        holder.execute("SELECT pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), "
                       "hashtext(%s))", (h.ACCOUNT,))
        with support.connect(db_url) as writer:
            writer.execute("SET lock_timeout = '200ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                writer.execute("UPDATE contacts SET confirmed_at = now() WHERE id = %s", (cid,))
            writer.execute("UPDATE contacts SET name = 'x' WHERE id = %s", (cid,))  # no fence


def _form(api: h.Api, **body: Any) -> dict[str, Any]:
    r = api.post("/forms", json={"name": "Newsletter", "from": "news@example.com",
                                 "tags": ["news"], **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_forms_are_created_listed_and_deleted_over_the_api(api: h.Api, public: h.Api) -> None:
    form = _form(api, redirect="https://example.com/thanks", embeddable=True)
    assert form["url"] == f"{unsubscribe.DEFAULT_PUBLIC_URL}/f/{form['id']}"
    assert form["double_opt_in"] is True and form["tags"] == ["news"]
    assert api.post("/forms", json={"name": "Newsletter", "from": "news@example.com"}
                    ).status_code == 422
    for bad in ({"redirect": "javascript:alert(1)"}, {"from": "not an address"},
                {"tags": [""]}):
        r = api.post("/forms", json={"name": "Other", "from": "news@example.com", **bad})
        assert r.status_code == 422, (bad, r.text)
    assert [f["id"] for f in api.get("/forms").json()["forms"]] == [form["id"]]
    # another account sees none of it
    other = api.get("/forms", headers=h.auth("other"))
    assert other.json() == {"forms": []}
    assert api.delete(f"/forms/{form['id']}", headers=h.auth("other")).status_code == 404
    assert public.get(f"/f/{form['id']}").status_code == 200
    assert api.delete(f"/forms/{form['id']}").status_code == 204
    assert public.get(f"/f/{form['id']}").status_code == 404
    assert api.delete(f"/forms/{form['id']}").status_code == 404


def test_the_form_page_is_small_strict_and_framed_only_when_embeddable(
        api: h.Api, public: h.Api) -> None:
    plain = _form(api)
    embeddable = _form(api, name="Embedded", embeddable=True,
                       redirect="https://example.com/thanks")
    r = public.get(f"/f/{plain['id']}?utm_source=x")
    assert r.status_code == 200
    assert 'name="email"' in r.text and 'type="email"' in r.text and 'for="email"' in r.text
    assert 'name="website"' in r.text  # the honeypot
    csp = _csp(r.headers["content-security-policy"])
    assert csp["default-src"] == "default-src 'none'"
    assert csp["frame-ancestors"] == "frame-ancestors 'none'"
    assert r.headers["x-frame-options"] == "DENY"
    assert "<script" not in r.text and "http" not in r.text.split("<body>")[1]
    r = public.get(f"/f/{embeddable['id']}")
    csp = _csp(r.headers["content-security-policy"])
    assert csp["frame-ancestors"] == "frame-ancestors *"
    assert csp["form-action"] == "form-action 'self' https://example.com"
    assert "x-frame-options" not in r.headers
    assert public.get(f"/f/{uuid.uuid4()}").status_code == 404
    assert public.get("/f/not-a-uuid").status_code == 404


def _post(public: h.Api, form_id: str, body: str, **headers: str) -> Any:
    return public.post(f"/f/{form_id}", content=body.encode(),
                       headers={**URLENCODED, **headers})


def test_an_existing_subscriber_gets_the_tags_and_no_mail(api: h.Api, public: h.Api,
                                                          conn: Conn) -> None:
    _add(conn, "old@example.com", tags=("old",))
    form = _form(api)
    r = _post(public, form["id"], "email=OLD%40example.com&name=Old")
    assert r.status_code == 200 and "Check your inbox" in r.text
    row = conn.execute("SELECT tags, confirmed_at IS NOT NULL AS confirmed FROM contacts "
                       "WHERE email = 'old@example.com'").fetchone()
    assert row == {"tags": ["old", "news"], "confirmed": True}
    events = conn.execute("SELECT action, source, details->>'mailed' AS mailed "
                          "FROM contact_events").fetchall()
    assert events == [{"action": "signup", "source": "form", "mailed": None}]


def test_honeypot_bad_input_body_limit_and_client_rate(api: h.Api, public: h.Api,
                                                       conn: Conn) -> None:
    form = _form(api, name="Limits")
    r = _post(public, form["id"], "email=bot%40example.com&website=http%3A%2F%2Fspam")
    assert r.status_code == 200 and "Check your inbox" in r.text
    assert conn.execute("SELECT count(*) AS n FROM contacts").fetchone() == {"n": 0}
    r = _post(public, form["id"], "email=not-an-address")
    assert r.status_code == 400 and "valid email" in r.text
    r = _post(public, form["id"], "email=" + "a" * 5000)
    assert r.status_code == 400
    r = public.post(f"/f/{form['id']}", json={"email": "json@example.com"})
    assert r.status_code == 400
    # 4 POSTs so far from this client; the default allows 10 a minute
    codes = [_post(public, form["id"], "email=x").status_code for _ in range(7)]
    assert codes[:6] == [400] * 6 and codes[6] == 429
    assert conn.execute("SELECT count(*) AS n FROM contacts").fetchone() == {"n": 0}


def _topics(api: h.Api) -> None:
    for tag, label in (("product", "Product news"), ("events", "Events")):
        r = api.post("/topics", json={"tag": tag, "label": label})
        assert r.status_code == 200, r.text


def test_topics_over_the_api(api: h.Api) -> None:
    _topics(api)
    r = api.post("/topics", json={"tag": "events", "label": "Meetups"})
    assert r.json()["label"] == "Meetups"
    assert [t["tag"] for t in api.get("/topics").json()["topics"]] == ["events", "product"]
    assert api.delete("/topics/events").status_code == 204
    assert api.delete("/topics/events").status_code == 404
    assert api.post("/topics", json={"tag": "", "label": "x"}).status_code == 422
    assert api.get("/topics", headers=h.auth("other")).json() == {"topics": []}


def _token(conn: Conn, cid: int, bid: Any, test: bool = False) -> str:
    secret = conn.execute("SELECT secret FROM unsubscribe_keys").fetchone()["secret"]  # type: ignore[index]
    return unsubscribe.Keys((secret,)).make(h.ACCOUNT, cid, bid, test=test)


def test_preferences_change_tags_and_are_recorded(api: h.Api, public: h.Api,
                                                  conn: Conn) -> None:
    _topics(api)
    cid = _add(conn, "pref@example.com", tags=("product", "vip"))
    bid = support.new_broadcast(conn, account=h.ACCOUNT)
    token = _token(conn, cid, bid)
    r = public.get(f"/p/{token}")
    assert r.status_code == 200
    assert 'value="product" checked' in r.text and 'value="events">' in r.text
    assert "Unsubscribe from everything" in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    r = public.post(f"/p/{token}", content=b"topic=events&topic=vip&action=save",
                    headers=URLENCODED)
    assert r.status_code == 200 and "saved" in r.text
    row = conn.execute("SELECT tags FROM contacts WHERE id = %s", (cid,)).fetchone()
    assert row == {"tags": ["vip", "events"]}  # vip is no topic: kept, never added
    ev = conn.execute("SELECT action, source, broadcast_id, details FROM contact_events"
                      ).fetchall()
    assert ev == [{"action": "preferences", "source": "preferences", "broadcast_id": bid,
                   "details": {"added": ["events"], "removed": ["product"]}}]
    # a test send's link changes nothing
    r = public.post(f"/p/{_token(conn, cid, bid, test=True)}",
                    content=b"action=save", headers=URLENCODED)
    assert r.status_code == 200 and "test send" in r.text
    assert conn.execute("SELECT tags FROM contacts WHERE id = %s",
                        (cid,)).fetchone() == {"tags": ["vip", "events"]}
    r = public.post(f"/p/{token}", content=b"action=unsubscribe", headers=URLENCODED)
    assert r.status_code == 200 and "unsubscribed from everything" in r.text
    row = conn.execute("SELECT unsubscribed_at IS NOT NULL AS u FROM contacts").fetchone()
    assert row == {"u": True}
    assert conn.execute("SELECT source FROM contact_events WHERE action = 'unsubscribe'"
                        ).fetchall() == [{"source": "preferences"}]
    assert public.get("/p/forged").status_code == 400


def test_web_view_refuses_drafts_and_strangers(public: h.Api, conn: Conn) -> None:
    cid = _add(conn, "v@example.com")
    draft = support.new_broadcast(conn, account=h.ACCOUNT, send=False)
    assert public.get(f"/v/{_token(conn, cid, draft)}").status_code == 404
    assert public.get("/v/forged").status_code == 400
    # a text-only broadcast is shown as text, escaped; a contact who was no recipient: 404
    conn.execute("UPDATE broadcasts SET text_body = '<b>Hi</b> {{ contact.email }}' "
                 "WHERE id = %s", (draft,))
    assert broadcasts.send(conn, h.ACCOUNT, draft)["queued"] == 1
    r = public.get(f"/v/{_token(conn, cid, draft)}")
    assert r.status_code == 200
    assert "&lt;b&gt;Hi&lt;/b&gt; v@example.com" in r.text and "<b>" not in r.text
    late = _add(conn, "late@example.com")
    assert public.get(f"/v/{_token(conn, late, draft)}").status_code == 404


def test_imports_and_resubscribes_never_confirm_a_sign_up(conn: Conn) -> None:
    cid = _add(conn, "s@example.com", confirmed=False)
    contacts.upsert(conn, h.ACCOUNT, [{"email": "s@example.com", "name": "S", "tags": ["x"],
                                       "attributes": {}}])
    conn.execute("UPDATE contacts SET unsubscribed_at = now() WHERE id = %s", (cid,))
    contacts.resubscribe(conn, h.ACCOUNT, "s@example.com", source="cli", actor={})
    row = conn.execute("SELECT name, confirmed_at, unsubscribed_at FROM contacts").fetchone()
    assert row == {"name": "S", "confirmed_at": None, "unsubscribed_at": None}


def _messages(conn: Conn) -> list[dict[str, Any]]:
    return conn.execute("SELECT to_address, category, status, from_address, subject, text_body "
                        "FROM messages ORDER BY created_at, id").fetchall()


def _link(text: str) -> str:
    (line,) = [x for x in text.splitlines() if "/f/confirm/" in x]
    return line.strip().removeprefix(unsubscribe.DEFAULT_PUBLIC_URL)


def test_the_same_answer_for_new_existing_unconfirmed_and_unsubscribed_addresses(
        api: h.Api, public: h.Api, conn: Conn) -> None:
    form = _form(api)
    _add(conn, "member@example.com", tags=("news",))
    gone = _add(conn, "gone@example.com", tags=("news",))
    conn.execute("UPDATE contacts SET unsubscribed_at = now() WHERE id = %s", (gone,))
    _add(conn, "waiting@example.com", confirmed=False)
    answers = [_post(public, form["id"], f"email={who}%40example.com")
               for who in ("new", "member", "waiting", "gone")]
    assert {a.status_code for a in answers} == {200}
    assert len({a.text for a in answers}) == 1 and "Check your inbox" in answers[0].text
    assert len({a.headers["content-security-policy"] for a in answers}) == 1
    # a confirmation went to each address that needs one, on the messages path
    sent = _messages(conn)
    assert sorted(m["to_address"] for m in sent) == [
        "gone@example.com", "new@example.com", "waiting@example.com"]
    assert {(m["category"], m["status"], m["from_address"]) for m in sent} == {
        ("confirmation", "queued", "news@example.com")}
    row = conn.execute("SELECT confirmed_at, unsubscribed_at IS NOT NULL AS u FROM contacts "
                       "WHERE email = 'new@example.com'").fetchone()
    assert row == {"confirmed_at": None, "u": False}
    # the unsubscribed person stays unsubscribed until they confirm again
    assert conn.execute("SELECT unsubscribed_at IS NOT NULL AS u FROM contacts WHERE id = %s",
                        (gone,)).fetchone() == {"u": True}
    # with a redirect, every address gets the same 303
    redirecting = _form(api, name="R", redirect="https://example.com/thanks")
    answers = [_post(public, redirecting["id"], f"email={who}%40example.com")
               for who in ("new2", "member", "gone")]
    assert {(a.status_code, a.headers["location"]) for a in answers} == {
        (303, "https://example.com/thanks")}


def test_get_confirms_nothing_post_confirms_with_the_forms_tags(api: h.Api, public: h.Api,
                                                                conn: Conn) -> None:
    form = _form(api)
    _post(public, form["id"], "email=ann%40example.com&name=Ann")
    (mail,) = _messages(conn)
    link = _link(mail["text_body"])
    for _ in range(2):
        r = public.get(link)
        assert r.status_code == 200 and "Confirm" in r.text and "<form" in r.text
    row = conn.execute("SELECT name, tags, confirmed_at FROM contacts").fetchone()
    assert row == {"name": "Ann", "tags": [], "confirmed_at": None}
    r = public.post(link, content=b"confirm=yes", headers=URLENCODED)
    assert r.status_code == 200 and "subscribed" in r.text
    row = conn.execute("SELECT tags, confirmed_at IS NOT NULL AS c FROM contacts").fetchone()
    assert row == {"tags": ["news"], "c": True}
    ev = conn.execute("SELECT action, source, details->>'form' AS form, "
                      "details->>'confirmed' AS confirmed FROM contact_events "
                      "WHERE action = 'confirm'").fetchall()
    assert ev == [{"action": "confirm", "source": "form", "form": form["id"],
                   "confirmed": "true"}]
    # a second click is fine and records nothing more
    assert public.post(link, content=b"confirm=yes", headers=URLENCODED).status_code == 200
    assert conn.execute("SELECT count(*) AS n FROM contact_events WHERE action = 'confirm'"
                        ).fetchone() == {"n": 1}
    assert public.get("/f/confirm/forged").status_code == 400


def test_an_old_link_does_not_undo_a_later_unsubscribe(api: h.Api, public: h.Api,
                                                       conn: Conn) -> None:
    form = _form(api)
    _post(public, form["id"], "email=flip%40example.com")
    link = _link(_messages(conn)[0]["text_body"])
    assert public.post(link, content=b"confirm=yes", headers=URLENCODED).status_code == 200
    conn.execute("UPDATE contacts SET unsubscribed_at = clock_timestamp() + interval '1 second'")
    r = public.post(link, content=b"confirm=yes", headers=URLENCODED)
    assert r.status_code == 409
    assert conn.execute("SELECT unsubscribed_at IS NOT NULL AS u FROM contacts"
                        ).fetchone() == {"u": True}


def test_at_most_three_confirmations_per_address_per_day(api: h.Api, public: h.Api,
                                                         conn: Conn) -> None:
    form = _form(api)
    answers = [_post(public, form["id"], "email=victim%40example.com") for _ in range(5)]
    assert len({(a.status_code, a.text) for a in answers}) == 1
    assert [m["to_address"] for m in _messages(conn)] == ["victim@example.com"] * 3
    # a day later the address may be mailed again
    conn.execute("UPDATE contact_events SET at = at - interval '25 hours'")
    _post(public, form["id"], "email=victim%40example.com")
    assert len(_messages(conn)) == 4


def test_a_form_without_double_opt_in_subscribes_at_once(api: h.Api, public: h.Api,
                                                         conn: Conn) -> None:
    form = _form(api, double_opt_in=False)
    gone = _add(conn, "gone@example.com")
    conn.execute("UPDATE contacts SET unsubscribed_at = now() WHERE id = %s", (gone,))
    answers = [_post(public, form["id"], f"email={w}%40example.com") for w in ("now", "gone")]
    assert len({a.text for a in answers}) == 1 and "Thank you" in answers[0].text
    assert _messages(conn) == []
    rows = conn.execute("SELECT email, tags, pgcast_mailable(c) AS m FROM contacts c "
                        "ORDER BY email").fetchall()
    # an anonymous POST never resubscribes someone who left
    assert rows == [{"email": "gone@example.com", "tags": [], "m": False},
                    {"email": "now@example.com", "tags": ["news"], "m": True}]


def test_the_archive_lists_sent_archived_broadcasts_with_no_ones_data(
        api: h.Api, public: h.Api, conn: Conn) -> None:
    _add(conn, "secret-person@example.com", tags=("news",))
    conn.execute("UPDATE contacts SET name = 'Secret Name'")
    html = "<p>Hi {{ contact.name or 'reader' }} {{ contact.email }}</p>"
    ids = []
    for archive in (True, False, True):
        r = api.post("/broadcasts", json={"subject": "Issue", "from": "news@example.com",
                                          "html": html, "archive": archive})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    # only sent broadcasts are listed: the first is sent, the last stays a draft
    for bid in ids[:2]:
        conn.execute("UPDATE broadcasts SET status = 'sent', finished_at = now() "
                     "WHERE id = %s", (bid,))
    assert public.get("/a/acme-news").status_code == 404
    conn.execute("INSERT INTO archives (account, slug) VALUES (%s, 'acme-news')", (h.ACCOUNT,))
    page = public.get("/a/acme-news")
    assert page.status_code == 200
    assert f"/a/acme-news/{ids[0]}" in page.text
    assert ids[1] not in page.text and ids[2] not in page.text
    shown = public.get(f"/a/acme-news/{ids[0]}")
    assert shown.status_code == 200 and "Hi reader" in shown.text
    assert "secret" not in shown.text.lower()
    csp = _csp(shown.headers["content-security-policy"])
    assert csp["default-src"] == "default-src 'none'" and "sandbox" in csp
    for bid in ids[1:]:
        assert public.get(f"/a/acme-news/{bid}").status_code == 404
    assert public.get("/a/other/" + ids[0]).status_code == 404


def test_archive_enable_from_the_cli(db_url: str, conn: Conn) -> None:
    done = support.pgcast(db_url, "archive", "enable", h.ACCOUNT, "--slug", "acme")
    assert '"slug": "acme"' in done.stdout
    taken = support.pgcast(db_url, "archive", "enable", "other", "--slug", "acme", check=False)
    assert taken.returncode == 2 and "taken" in taken.stderr
    bad = support.pgcast(db_url, "archive", "enable", "other", "--slug", "No Way", check=False)
    assert bad.returncode == 2 and "slug" in bad.stderr


def test_expired_deleted_suppressed_and_listed(api: h.Api, public: h.Api, conn: Conn) -> None:
    from pgcast.mail import confirm

    form = _form(api)
    sup = _add(conn, "bounced@example.com")
    conn.execute("UPDATE contacts SET suppressed_at = now(), suppressed_reason = 'bounce' "
                 "WHERE id = %s", (sup,))
    _post(public, form["id"], "email=bounced%40example.com")
    assert _messages(conn) == []  # a suppressed address is never mailed
    _post(public, form["id"], "email=late%40example.com")
    (mail,) = _messages(conn)
    key = conn.execute("SELECT idempotency_key FROM messages").fetchone()
    event = conn.execute("SELECT id FROM contact_events WHERE action = 'signup'").fetchone()
    assert key == {"idempotency_key": f"confirmation:{event['id']}"}  # type: ignore[index]
    listed = api.get("/contacts?status=unconfirmed").json()["contacts"]
    assert [(c["email"], c["status"]) for c in listed] == [("late@example.com", "unconfirmed")]
    secret = conn.execute("SELECT secret FROM unsubscribe_keys").fetchone()
    old = confirm.make(unsubscribe.Keys((secret["secret"],)),  # type: ignore[index]
                       "late@example.com", uuid.UUID(form["id"]), now=1_000_000)
    assert public.get(f"/f/confirm/{old}").status_code == 410
    assert public.post(f"/f/confirm/{old}", content=b"confirm=yes",
                       headers=URLENCODED).status_code == 410
    assert api.delete(f"/forms/{form['id']}").status_code == 204
    r = public.post(_link(mail["text_body"]), content=b"confirm=yes", headers=URLENCODED)
    assert r.status_code == 409
    assert conn.execute("SELECT confirmed_at FROM contacts WHERE email = 'late@example.com'"
                        ).fetchone() == {"confirmed_at": None}


def test_too_fast_says_when_to_come_back(api: h.Api, public: h.Api) -> None:
    form = _form(api)
    answers = [_post(public, form["id"], "email=x") for _ in range(11)]
    assert [a.status_code for a in answers] == [400] * 10 + [429]
    assert answers[-1].headers["retry-after"] == "60"


def test_export_leaves_unconfirmed_sign_ups_out(db_url: str, conn: Conn) -> None:
    _add(conn, "in@example.com", account="default")
    _add(conn, "waiting@example.com", account="default", confirmed=False)
    done = support.pgcast(db_url, "contacts", "export", "-")
    lines = done.stdout.splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["in@example.com"]
    counted = json.loads(support.pgcast(db_url, "contacts", "count").stdout)
    assert (counted["subscribed"], counted["unconfirmed"]) == (1, 1)


def test_a_scheduled_start_leaves_unconfirmed_contacts_out(conn: Conn) -> None:
    _add(conn, "yes@example.com")
    _add(conn, "pending@example.com", confirmed=False)
    bid = support.new_broadcast(conn, account=h.ACCOUNT, send=False)
    conn.execute("UPDATE broadcasts SET status = 'scheduled', scheduled_at = now() "
                 "WHERE id = %s", (bid,))
    from pgcast.sql.queries import QUERIES  # the scheduler's own statement (pgcast_start_due_v3)

    started = conn.execute(QUERIES["start_due"]).fetchall()
    assert [(r["broadcast_id"], r["queued"]) for r in started] == [(bid, 1)]
    assert conn.execute("SELECT email FROM broadcast_recipients").fetchall() == [
        {"email": "yes@example.com"}]


def test_forms_and_topics_from_the_cli(db_url: str) -> None:
    made = json.loads(support.pgcast(
        db_url, "forms", "create", "Weekly", "--tags", "a, b", "--from", "n@example.com",
        "--no-double-opt-in", "--redirect", "https://example.com/ok", "--embeddable").stdout)
    listed = json.loads(support.pgcast(db_url, "forms", "list").stdout)["forms"]
    assert [(f["id"], f["name"], f["tags"], f["double_opt_in"], f["redirect_url"],
             f["embeddable"], f["url"]) for f in listed] == [
        (made["id"], "Weekly", ["a", "b"], False, "https://example.com/ok", True, made["url"])]
    again = support.pgcast(db_url, "forms", "create", "Weekly", "--from", "n@example.com",
                           check=False)
    assert again.returncode == 2 and "already has a form" in again.stderr
    assert support.pgcast(db_url, "forms", "delete", made["id"]).returncode == 0
    gone = support.pgcast(db_url, "forms", "delete", made["id"], check=False)
    assert gone.returncode == 2
    support.pgcast(db_url, "topics", "add", "a", "--label", "Topic A")
    assert json.loads(support.pgcast(db_url, "topics", "list").stdout)["topics"][0]["label"] \
        == "Topic A"
    assert support.pgcast(db_url, "topics", "remove", "a").returncode == 0
    assert support.pgcast(db_url, "topics", "remove", "a", check=False).returncode == 2
