"""Issue 23 item 5: test sends are no relay; an account's senders bound its From."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import psycopg
import pytest

from pgcast.bin import cli
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT
PAYPAL = '"PayPal Security" <security@paypal.com>'


def _create(api: h.Api, from_: str) -> str:
    r = api.post("/broadcasts", json={"subject": "Hi", "from": from_, "text": "Hello"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _at() -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()


@pytest.fixture
def cli_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DATABASE_URL", db_url)
    return db_url


def test_senders_are_an_operator_list_normalized(
        cli_db: str, capsys: pytest.CaptureFixture[str], api: h.Api) -> None:
    assert _cli(capsys, "senders", "add", A, "News.Example.COM")[0] == 0
    code, out, _ = _cli(capsys, "senders", "add", A, "Boss@Other.ORG")
    assert code == 0 and json.loads(out)["added"] is True
    assert json.loads(_cli(capsys, "senders", "add", A, "boss@other.org")[1])["added"] is False
    assert _cli(capsys, "senders", "add", "beta", "beta.example")[0] == 0
    code, out, _ = _cli(capsys, "senders", "list", A)
    assert [s["sender"] for s in json.loads(out)["senders"]] == ["boss@other.org",
                                                                 "news.example.com"]
    code, out, _ = _cli(capsys, "senders", "list")
    assert [(s["account"], s["sender"]) for s in json.loads(out)["senders"]] == [
        (A, "boss@other.org"), (A, "news.example.com"), ("beta", "beta.example")]
    code, _, err = _cli(capsys, "senders", "add", A, "not a domain!")
    assert code == 2 and "not an address or a domain" in err
    assert _cli(capsys, "senders", "remove", A, "news.example.com")[0] == 0
    assert _cli(capsys, "senders", "remove", A, "news.example.com")[0] == 1
    code, _, err = _cli(capsys, "senders", "add", "x" * 201, "example.com")
    assert code == 2 and "at most 200 characters" in err
    # no tenant route: the list is the operator's
    assert api.get("/senders").status_code == 404
    assert api.post("/senders", json={"sender": "paypal.com"}).status_code == 404


def test_without_senders_any_from_is_allowed_as_before(api: h.Api) -> None:
    bid = _create(api, PAYPAL)
    r = api.post(f"/broadcasts/{bid}/test", json={"to": ["me@example.com"]})
    assert r.status_code == 202, r.text


def test_with_senders_the_from_must_be_one_at_send_schedule_and_test(
        api: h.Api, cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    api.post("/contacts", json={"contacts": [{"email": "ann@example.com"}]})
    assert _cli(capsys, "senders", "add", A, "example.com")[0] == 0
    assert _cli(capsys, "senders", "add", A, "ceo@other.org")[0] == 0
    for from_ in (PAYPAL, "ceo@sub.example.com", "cfo@other.org"):
        bid = _create(api, from_)
        for path, body in (("test", {"to": ["me@example.com"]}), ("schedule", {"at": _at()}),
                           ("send", None)):
            r = api.post(f"/broadcasts/{bid}/{path}", json=body)
            assert r.status_code == 422, (from_, path, r.text)
            assert "is not a sender this account may use" in r.json()["message"]
            assert "pgcast senders add" in r.json()["message"]
        code, _, err = _cli(capsys, "broadcast", "send", bid, "--account", A)
        assert code == 2 and "is not a sender this account may use" in err
        code, _, err = _cli(capsys, "broadcast", "schedule", bid, "--at", _at(), "--account", A)
        assert code == 2 and "is not a sender this account may use" in err
        code, _, err = _cli(capsys, "broadcast", "test", bid, "--to", "me@example.com",
                            "--account", A)
        assert code == 2 and "is not a sender this account may use" in err
        status = api.get(f"/broadcasts/{bid}").json()["status"]
        assert status == "draft"
    for from_ in ("News <news@example.com>", "ceo@other.org", "NEWS@Example.com"):
        bid = _create(api, from_)
        r = api.post(f"/broadcasts/{bid}/test", json={"to": ["me@example.com"]})
        assert r.status_code == 202, (from_, r.text)
        r = api.post(f"/broadcasts/{bid}/send")
        assert r.status_code == 200 and r.json()["success"], (from_, r.text)
    bid = _create(api, "news@example.com")
    assert _cli(capsys, "broadcast", "schedule", bid, "--at", _at(), "--account", A)[0] == 0


def test_test_sends_refuse_unsubscribed_suppressed_and_erased_addresses(
        api: h.Api, conn: Conn, cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    r = api.post("/contacts", json={"contacts": [
        {"email": f"{n}@example.com"} for n in ("unsub", "bounced", "gone", "fine")]})
    assert r.status_code == 200, r.text
    assert api.post("/contacts/unsubscribe", json={"email": "Unsub@example.com"}).status_code == 200
    conn.execute("UPDATE contacts SET suppressed_at = now(), suppressed_reason = 'complaint' "
                 "WHERE email = 'bounced@example.com'")
    assert api.post("/contacts/erase", json={"email": "gone@example.com"}).status_code == 200
    bid = _create(api, "news@example.com")
    to = ["unsub@example.com", "BOUNCED@example.com", "gone@example.com", "fine@example.com",
          "stranger@example.org"]
    r = api.post(f"/broadcasts/{bid}/test", json={"to": to})
    assert r.status_code == 422, r.text
    message = r.json()["message"]
    assert "unsub@example.com is unsubscribed" in message
    assert "bounced@example.com is suppressed (complaint)" in message.lower()
    assert "gone@example.com is erased" in message
    assert "fine@" not in message and "stranger@" not in message
    assert conn.execute("SELECT count(*) AS n FROM test_sends").fetchone() == {"n": 0}
    code, _, err = _cli(capsys, "broadcast", "test", bid, "--to", "gone@example.com",
                        "--account", A)
    assert code == 2 and "gone@example.com is erased" in err
    r = api.post(f"/broadcasts/{bid}/test", json={"to": to[3:]})
    assert r.status_code == 202, r.text


def test_a_scheduled_broadcasts_from_cannot_be_edited_past_the_rule(
        cli_db: str, capsys: pytest.CaptureFixture[str], api: h.Api, conn: Conn) -> None:
    """Scheduled with an allowed From, then edited (PATCH or `broadcast edit`) to one the
    account may not use: refused, so the start never sends as it."""
    assert _cli(capsys, "senders", "add", A, "news.example.com")[0] == 0
    bid = _create(api, "news@news.example.com")
    assert api.post(f"/broadcasts/{bid}/schedule", json={"at": _at()}).status_code == 200
    r = api.patch(f"/broadcasts/{bid}", json={"from": PAYPAL})
    assert r.status_code == 422 and "not a sender this account may use" in r.json()["message"]
    code, _, err = _cli(capsys, "broadcast", "edit", bid, "--from", PAYPAL, "--account", A)
    assert code == 2 and "not a sender this account may use" in err
    assert api.patch(f"/broadcasts/{bid}", json={"from": "Team <team@news.example.com>"}
                     ).status_code == 200  # an allowed one still is
    row = conn.execute("SELECT status, from_address FROM broadcasts WHERE id = %s",
                       (bid,)).fetchone()
    assert row == {"status": "scheduled", "from_address": "Team <team@news.example.com>"}
    # a draft may hold any From until it is sent or scheduled, as at create
    draft = _create(api, "news@news.example.com")
    assert api.patch(f"/broadcasts/{draft}", json={"from": PAYPAL}).status_code == 200
    assert api.post(f"/broadcasts/{draft}/schedule", json={"at": _at()}).status_code == 422
