"""Hostile and careless input at the API's edge (issue 11 §2 and §4, issue 16's API details)."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import anyio
import httpx
import psycopg
import pytest

from pgcast.api import app as api_app
from pgcast.sql import broadcasts
from tests import support
from tests.integration import test_api_helpers as h
from tests.integration import test_api_security as sec

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT


def _draft(api: h.Api, **body: Any) -> dict[str, Any]:
    r = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com",
                                      "text": "Hello", **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


# -- tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("claim, value", [
    ("account", "ac\u0000me"), ("account", "acme\ud800"), ("account", "a\r\nb"),
    ("sub", "al\u0000ice"), ("sub", "\udfff"),
])
def test_a_signed_token_with_nul_or_a_lone_surrogate_is_401(
        api: h.Api, conn: Conn, claim: str, value: str) -> None:
    support.seed_contacts(conn, 2, account=A)
    victim = support.new_broadcast(conn, account=A)
    token = sec.forged({"alg": "HS256", "typ": "JWT"}, sec.claims(**{claim: value}),
                       h.SECRET.encode())
    sec.attack(api, conn, victim, sec.bearer(token), 401)


def test_401_and_400_bodies_are_generic(api: h.Api, db_url: str) -> None:
    answers = {api.get("/broadcasts", headers=headers).json()["message"] for headers in (
        {"Authorization": ""}, {"Authorization": "Basic x"}, h.auth(ttl=-120),
        h.auth(key="another-secret-that-is-long-enough-xx"), sec.bearer("a.b.c"))}
    assert answers == {"a valid bearer token is required"}
    r = api.post("/broadcasts", content=b'{"subject": "x",', headers={
        "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json() == {"error": "malformed_json", "message": "the body is not valid JSON"}
    r = api.get(f"/broadcasts/{uuid.uuid4()}/recipients", params={"cursor": "A" * 300})
    assert r.json()["message"] == "cursor is not a cursor this API returned for this list"


# -- streams --------------------------------------------------------------------------------


def test_a_stream_ends_when_its_token_expires(db_url: str, conn: Conn) -> None:
    bid = support.new_broadcast(conn, account=A, send=False)  # a draft never ends by itself
    app = api_app.create_app(h.settings(PGCAST_JWT_LEEWAY="0"), db_url)
    seen: list[str] = []

    async def watch() -> int:
        async with app.router.lifespan_context(app):
            with anyio.fail_after(30):
                return await h.sse(app, f"/broadcasts/{bid}/events", h.auth(ttl=4),
                                   lambda name, data: seen.append(name))

    assert anyio.run(watch) == 200
    assert seen == ["progress", "expired"]
    assert app.state.streams == {}  # the slot is back


def test_streams_per_account_are_capped(db_url: str, conn: Conn) -> None:
    draft = support.new_broadcast(conn, account=A, send=False)
    theirs = support.new_broadcast(conn, account="other", send=False)
    finished = support.new_broadcast(conn, account=A, send=False)
    broadcasts.cancel(conn, A, finished)  # terminal: its stream ends by itself
    app = api_app.create_app(h.settings(PGCAST_API_MAX_STREAMS="2"), db_url)
    answers: list[int] = []

    async def run() -> None:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for bid, account in ((draft, A), (draft, A), (theirs, "other")):
                        opened = anyio.Event()
                        tg.start_soon(h.sse, app, f"/broadcasts/{bid}/events",
                                      h.auth(account), lambda name, data, e=opened: e.set())
                        await opened.wait()  # each account under its own cap
                    r = await client.get(f"/broadcasts/{draft}/events", headers=h.auth())
                    answers.append(r.status_code)
                    assert r.json()["error"] == "too_many_streams" and r.headers["retry-after"]
                    assert app.state.streams == {A: 2, "other": 1}
                    tg.cancel_scope.cancel()  # the streams end: their slots come back
                r = await client.get(f"/broadcasts/{finished}/events", headers=h.auth())
                answers.append(r.status_code)

    anyio.run(run)
    assert answers == [429, 200]
    assert app.state.streams == {}


# -- paging ---------------------------------------------------------------------------------


def test_recipient_cursors_are_opaque_and_bound_to_the_account(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 5, account=A)
    bid = support.new_broadcast(conn, account=A)
    first = api.get(f"/broadcasts/{bid}/recipients", params={"limit": 2}).json()
    cursor = first["next_cursor"]
    ids = [r["contact_id"] for r in conn.execute(
        "SELECT contact_id FROM broadcast_recipients ORDER BY contact_id").fetchall()]
    assert cursor != str(ids[1]) and not cursor.isdigit()
    again = api.get(f"/broadcasts/{bid}/recipients", params={"limit": 2}).json()["next_cursor"]
    assert again != cursor  # a fresh nonce each time: equal positions do not look equal
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    assert ids[1].to_bytes(8, "big") not in raw  # sealed, not encoded
    r = api.get(f"/broadcasts/{bid}/recipients", params={"limit": 2, "cursor": cursor})
    assert [x["email"] for x in r.json()["recipients"]] == ["user2@example.com",
                                                            "user3@example.com"]
    # the same account's other broadcast, or a guessed integer: refused
    other = support.new_broadcast(conn, account=A)
    for bad in ((other, cursor), (bid, str(ids[1])), (bid, cursor[:-2] + "AA")):
        r = api.get(f"/broadcasts/{bad[0]}/recipients", params={"cursor": bad[1]})
        assert r.status_code == 422, r.text


def test_cursor_keys_are_shared_by_processes_with_the_same_secret() -> None:
    from pgcast.api import config, cursors, errors

    one, two = h.settings(), h.settings()
    assert one.cursor_key == two.cursor_key and len(one.cursor_key) == 32
    sealed = cursors.seal(one.cursor_key, "scope", 42)
    assert cursors.open_(two.cursor_key, "scope", sealed) == 42
    other = h.settings(PGCAST_API_CURSOR_SECRET="c" * 32)
    with pytest.raises(errors.InvalidBody):
        cursors.open_(other.cursor_key, "scope", sealed)
    with pytest.raises(errors.ConfigError, match="PGCAST_API_CURSOR_SECRET must be at least 32"):
        h.settings(PGCAST_API_CURSOR_SECRET="short")
    assert config.cursor_key(None, None) != config.cursor_key(None, None)  # public key: random


def test_limits_from_the_environment() -> None:
    from pgcast.api import config, errors

    s = h.settings()
    assert (s.limit_concurrency, s.timeout_keep_alive, s.max_streams, s.total_streams) == (
        1000, 5.0, 20, 500)
    s = h.settings(PGCAST_API_LIMIT_CONCURRENCY="10", PGCAST_API_TIMEOUT_KEEP_ALIVE="30",
                   PGCAST_API_MAX_STREAMS="3")
    assert (s.limit_concurrency, s.timeout_keep_alive, s.max_streams, s.total_streams) == (
        10, 30.0, 3, 5)
    for env, message in (({"PGCAST_API_LIMIT_CONCURRENCY": "3"}, "at least 4"),
                         ({"PGCAST_API_MAX_STREAMS": "0"}, "at least 1"),
                         ({"PGCAST_API_TIMEOUT_KEEP_ALIVE": "x"}, "not a number")):
        with pytest.raises(errors.ConfigError, match=message):
            h.settings(**env)
    assert config.MIN_LIMIT_CONCURRENCY == 4


def test_the_last_page_says_there_is_no_next_page(api: h.Api, conn: Conn) -> None:
    support.seed_contacts(conn, 4, account=A)
    bid = support.new_broadcast(conn, account=A)
    page = api.get(f"/broadcasts/{bid}/recipients", params={"limit": 2}).json()
    page = api.get(f"/broadcasts/{bid}/recipients",
                   params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert len(page["recipients"]) == 2 and page["next_cursor"] is None
    for i in range(4):
        _draft(api, subject=f"n{i}")
    page = api.get("/broadcasts", params={"limit": 2}).json()
    assert len(page["broadcasts"]) == 2 and page["next_cursor"]
    page = api.get("/broadcasts", params={"limit": 3, "cursor": page["next_cursor"]}).json()
    assert len(page["broadcasts"]) == 3 and page["next_cursor"] is None  # 2 drafts + the sent one


# -- values refused at the edge (422 naming the field) --------------------------------------


@pytest.mark.parametrize("field, value, expected", [
    ("subject", "Hello\r\nBcc: evil@evil.com", "subject: must not contain a control character"),
    ("subject", "Hi\u2028there", "subject: must not contain a control character (U+2028)"),
    ("from", "evil@evil.com <a@example.com>", "from: is not a valid address line"),
    ("from", "a@example.com, b@example.com", "from: must be exactly one address"),
    ("from", "nope", "from: "),
    ("from", "üser@example.com", "from: "),
    ("tag", "a\nb", "tags: must not contain a control character"),
])
def test_broadcast_values_are_refused_naming_the_field(api: h.Api, conn: Conn, field: str,
                                                       value: str, expected: str) -> None:
    r = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com", "text": "x",
                                      field: value})
    assert r.status_code == 422 and r.json()["message"].startswith(expected), r.text
    bid = _draft(api)["id"]
    r = api.patch(f"/broadcasts/{bid}", json={field: value})
    assert r.status_code == 422 and r.json()["message"].startswith(expected), r.text
    row = conn.execute("SELECT subject, from_address, segment_tag FROM broadcasts").fetchone()
    assert row == {"subject": "Hi", "from_address": "news@example.com", "segment_tag": None}


def test_missing_fields_are_all_named(api: h.Api) -> None:
    r = api.post("/broadcasts", json={"text": "x"})
    assert r.status_code == 422
    assert r.json()["message"] == "body.subject: required; body.from: required"
    assert [d["field"] for d in r.json()["details"]] == ["body.subject", "body.from"]


def test_create_answers_201_with_location_and_echoes_from_as_given(api: h.Api) -> None:
    r = api.post("/broadcasts", json={"subject": "Grüße", "from": "Zoë <z@acme.example>",
                                      "text": "x"})
    assert r.status_code == 201
    assert r.headers["location"] == f"/broadcasts/{r.json()['id']}"
    assert r.json()["from"] == "Zoë <z@acme.example>"
    assert api.get(r.headers["location"]).json()["from"] == "Zoë <z@acme.example>"
    r = api.patch(r.headers["location"], json={"from": '"Acme, Inc." <news@acme.example>'})
    assert r.json()["from"] == '"Acme, Inc." <news@acme.example>'


def test_edit_and_send_name_the_caller_in_the_audit_log(db_url: str, conn: Conn) -> None:
    support.seed_contacts(conn, 2, account=A)
    with h.client(db_url) as api:
        api.headers.update(h.auth(sub="alice"))
        bid = _draft(api)["id"]
        api.headers.update(h.auth(sub="bob"))
        assert api.patch(f"/broadcasts/{bid}", json={"subject": "New"}).status_code == 200
        api.headers.update(h.auth(sub="carol"))
        assert api.post(f"/broadcasts/{bid}/send").json()["queued"] == 2
    log = conn.execute("SELECT audit_log FROM broadcasts").fetchone()
    assert log is not None
    assert [(e["action"], e["details"].get("sub"), e["details"].get("via"))
            for e in log["audit_log"]] == [("create", "alice", "api"), ("edit", "bob", "api"),
                                           ("send", "carol", "api")]


def test_contacts_refuse_header_syntax_per_item_naming_the_field(api: h.Api,
                                                                 conn: Conn) -> None:
    r = api.post("/contacts", json={"contacts": [
        {"email": "bob@example.com", "name": "Bob\r\nBcc: evil@example.com"},
        {"email": "üser@example.com", "name": "Jürgen"},
        {"email": "x" * 8_000_000 + "@example.com"},
        {"email": "ok@bücher.example", "name": "Jürgen", "attributes": {"plan": "pro", "n": 3}},
        {"email": "many@example.com", "tags": [f"t{i}" for i in range(40_000)]},
        {"email": "attrs@example.com", "attributes": {"nested": {"x": 1}}},
    ]})
    assert r.status_code == 200, r.text
    reasons = {x["index"]: x["reason"] for x in r.json()["rejected"]}
    assert reasons[0].startswith("name: must not contain a control character (CR)")
    assert reasons[1].startswith("email: the part before @ must be ASCII")
    assert reasons[2] == "email: must be at most 254 characters"
    assert reasons[4] == "tags: at most 100 tags per contact"
    assert reasons[5].startswith("attributes.nested: must be a string, a number or a boolean")
    assert r.json()["upserted"] == 1 and 3 not in reasons
    row = conn.execute("SELECT email, name, attributes FROM contacts").fetchone()
    assert row == {"email": "ok@xn--bcher-kva.example", "name": "Jürgen",
                   "attributes": {"plan": "pro", "n": 3}}


def test_attributes_merge_and_must_be_an_object(api: h.Api, conn: Conn) -> None:
    api.post("/contacts", json={"contacts": [{"email": "a@example.com",
                                              "attributes": {"plan": "pro", "seats": 3}}]})
    api.post("/contacts", json={"contacts": [{"email": "a@example.com",
                                              "attributes": {"seats": 5}}]})
    row = conn.execute("SELECT attributes FROM contacts").fetchone()
    assert row == {"attributes": {"plan": "pro", "seats": 5}}
    r = api.post("/contacts", json={"contacts": [{"email": "a@example.com", "attributes": [1]}]})
    assert r.status_code == 422
    assert r.json()["message"] == "body.contacts[0].attributes: must be an object or null"


def test_unsubscribe_bounds_and_checks_the_address(api: h.Api, conn: Conn) -> None:
    r = api.post("/contacts/unsubscribe", json={"email": "x" * 8_000_000})
    assert r.status_code == 422 and r.json()["message"].startswith("email: must be at most")
    r = api.post("/contacts/unsubscribe", json={"email": "a\r\n@example.com"})
    assert r.status_code == 422 and "control character" in r.json()["message"]
    api.post("/contacts", json={"contacts": [{"email": "ok@bücher.example"}]})
    r = api.post("/contacts/unsubscribe", json={"email": "OK@bücher.example"})
    assert r.status_code == 200 and r.json()["email"] == "ok@xn--bcher-kva.example"

