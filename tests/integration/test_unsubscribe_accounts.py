"""Issue 23 item 4: an unsubscribe link works for every account name pgcast accepts."""

from __future__ import annotations

import base64
import os
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pgcast.bin import cli
from pgcast.mail import unsubscribe, validate
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
ONE_CLICK = {"content": b"List-Unsubscribe=One-Click",
             "headers": {"Content-Type": "application/x-www-form-urlencoded"}}
LONG = "é" * 200  # 200 characters, 400 bytes: a valid JWT account
CUT = "a" + "é" * 150  # 301 bytes: the old 200-byte cut fell inside a character


@pytest.fixture
def public(db_url: str) -> Iterator[h.Api]:
    with h.client(db_url) as c:
        yield c


def _contact(db_url: str, account: str) -> tuple[int, str]:
    with h.client(db_url) as api:
        api.headers.update(h.auth(account))
        r = api.post("/contacts", json={"contacts": [{"email": "dora@example.com"}]})
        assert r.status_code == 200 and r.json()["rejected"] == [], r.text
        r = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com",
                                          "text": "{{ unsubscribe_url }}"})
        assert r.status_code == 201, r.text
        bid = r.json()["id"]
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT id FROM contacts WHERE account = %s", (account,)).fetchone()
    assert row is not None
    return int(row[0]), bid


def _keys(conn: Conn) -> unsubscribe.Keys:
    row = conn.execute("SELECT secret FROM unsubscribe_keys").fetchone()
    assert row is not None
    return unsubscribe.Keys((row["secret"],))


@pytest.mark.parametrize("account", [LONG, CUT, "acme"])
def test_a_link_unsubscribes_whatever_the_account_name(
        db_url: str, conn: Conn, public: h.Api, account: str) -> None:
    cid, bid = _contact(db_url, account)
    token = _keys(conn).make(account, cid, bid)
    r = public.post(f"/u/{token}", **ONE_CLICK)
    assert r.status_code == 200 and "You are unsubscribed" in r.text, r.text
    row = conn.execute("SELECT account, unsubscribed_at FROM contacts WHERE id = %s",
                       (cid,)).fetchone()
    assert row is not None and row["account"] == account and row["unsubscribed_at"] is not None
    assert len(token) <= unsubscribe.MAX_TOKEN


def _v1_token(secret: str, account: str, contact_id: int, bid: str) -> str:
    # what pgcast made before issue 23: the account cut to 200 bytes inside the sealed text
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"pgcast unsubscribe token v1").derive(secret.encode())
    plain = struct.pack(">BB16sq", 1, 0, uuid.UUID(bid).bytes, contact_id)
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, plain + account.encode()[:200],
                                 b"pgcast one-click unsubscribe")
    return base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()


@pytest.mark.parametrize("account", [LONG, CUT, "acme"])
def test_links_made_before_still_unsubscribe(
        db_url: str, conn: Conn, public: h.Api, account: str) -> None:
    cid, bid = _contact(db_url, account)
    secret = _keys(conn).secrets[0]
    r = public.post(f"/u/{_v1_token(secret, account, cid, bid)}", **ONE_CLICK)
    assert r.status_code == 200 and "You are unsubscribed" in r.text, r.text
    row = conn.execute("SELECT unsubscribed_at FROM contacts WHERE id = %s", (cid,)).fetchone()
    assert row is not None and row["unsubscribed_at"] is not None
    # an old link names its account: one made for another account's contact changes nothing
    other, _ = _contact(db_url, "other")
    r = public.post(f"/u/{_v1_token(secret, account, other, bid)}", **ONE_CLICK)
    assert r.status_code == 200
    row = conn.execute("SELECT unsubscribed_at FROM contacts WHERE id = %s", (other,)).fetchone()
    assert row == {"unsubscribed_at": None}


TOO_LONG = "x" * 201


def test_one_account_limit_in_the_api_the_cli_and_sql(
        db_url: str, conn: Conn, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with h.client(db_url) as api:
        api.headers.update(h.auth(TOO_LONG))
        assert api.get("/contacts").status_code == 401
    monkeypatch.setenv("DATABASE_URL", db_url)
    code = cli.main(["contacts", "unsubscribe", "a@example.com", "--account", TOO_LONG])
    assert code == 2
    assert "at most 200 characters" in capsys.readouterr().err
    for table, columns in (("contacts", "(account, email)"),
                           ("broadcasts", "(account, subject, from_address, text_body)")):
        values = "(%s, 'a@example.com')" if table == "contacts" else "(%s, 's', 'f@x.io', 't')"
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(f"INSERT INTO {table} {columns} VALUES {values}",  # type: ignore[arg-type]
                         (TOO_LONG,))
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(f"INSERT INTO {table} {columns} VALUES {values}",  # type: ignore[arg-type]
                         ("",))
    with pytest.raises(validate.errors.InvalidValue, match="at most 200"):
        validate.account(TOO_LONG)
    assert validate.account(LONG) == LONG
