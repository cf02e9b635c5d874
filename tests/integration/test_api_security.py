"""Authentication and tenant isolation: every attack is refused and changes no row."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pgcast.api import config, errors
from tests import support
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]


def snapshot(conn: Conn) -> Any:
    """Everything an attack could change."""
    return (conn.execute("SELECT * FROM broadcasts ORDER BY id").fetchall(),
            conn.execute("SELECT * FROM contacts ORDER BY id").fetchall(),
            conn.execute("SELECT broadcast_id, status, count(*) FROM broadcast_recipients "
                         "GROUP BY 1, 2 ORDER BY 1, 2").fetchall())


def attack(api: h.Api, conn: Conn, bid: uuid.UUID, headers: dict[str, str],
           expected: int) -> None:
    """Every kind of route with these headers answers `expected` and changes nothing."""
    before = snapshot(conn)
    calls: list[tuple[str, str, Any]] = [
        ("POST", f"/broadcasts/{bid}/cancel", None), ("POST", f"/broadcasts/{bid}/pause", None),
        ("PATCH", f"/broadcasts/{bid}", {"subject": "pwned"}),
        ("DELETE", f"/broadcasts/{bid}", None), ("POST", f"/broadcasts/{bid}/send", None),
        ("GET", f"/broadcasts/{bid}", None), ("GET", f"/broadcasts/{bid}/progress", None),
        ("GET", f"/broadcasts/{bid}/events", None), ("GET", f"/broadcasts/{bid}/recipients", None),
        ("POST", "/contacts", {"contacts": [{"email": "evil@example.com"}]}),
        ("POST", "/contacts/unsubscribe", {"email": "user1@example.com"}),
        ("POST", "/broadcasts", {"subject": "x", "from": "a@example.com", "text": "x"}),
    ]
    if expected == 401:
        calls += [("GET", "/broadcasts", None), ("GET", "/openapi.json", None)]
    for method, path, body in calls:
        r = api.request(method, path, json=body, headers=headers)
        if method == "POST" and path in ("/contacts", "/contacts/unsubscribe", "/broadcasts"):
            continue  # checked below: tenant-scoped writes land in the caller's own account
        assert r.status_code == expected, (method, path, r.status_code, r.text)
        if expected == 401:
            assert r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"].startswith("Bearer")
        else:
            assert r.json() == {"error": "not_found", "message": "broadcast not found"}
    after = snapshot(conn)
    if expected == 401:
        assert after == before
    else:  # the intruder's writes stay in its own account; the victim's rows are untouched
        victim = [[r for r in table if r.get("account", h.ACCOUNT) == h.ACCOUNT]
                  for table in after[:2]]
        assert victim == [[r for r in table if r.get("account", h.ACCOUNT) == h.ACCOUNT]
                          for table in before[:2]]
        assert after[2] == before[2]


@pytest.fixture
def victim(conn: Conn) -> uuid.UUID:
    support.seed_contacts(conn, 5, account=h.ACCOUNT)
    return support.new_broadcast(conn, account=h.ACCOUNT)


@pytest.fixture
def api(db_url: str) -> Iterator[h.Api]:
    with h.client(db_url) as c:
        yield c


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forged(header: dict[str, Any], claims: dict[str, Any], key: bytes | None,
           digest: str = "sha256") -> str:
    """A token built by hand (PyJWT refuses to make some of these)."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    sig = _b64(hmac.new(key, head.encode(), getattr(hashlib, digest)).digest()) if key else ""
    return f"{head}.{sig}"


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "mallory", "account": h.ACCOUNT, "iat": now, "exp": now + 600, **extra}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


HS256_ATTACKS: dict[str, Callable[[], dict[str, str]]] = {
    "no token": lambda: {},
    "empty bearer": lambda: {"Authorization": "Bearer "},
    "basic scheme": lambda: {"Authorization": "Basic dXNlcjpwYXNz"},
    "garbage": lambda: bearer("not.a.jwt"),
    "expired": lambda: h.auth(ttl=-120),  # beyond the 10 s leeway
    "wrong signature": lambda: h.auth(key="another-secret-that-is-long-enough-xx"),
    "alg none": lambda: bearer(forged({"alg": "none", "typ": "JWT"}, claims(), None)),
    "alg none, signed": lambda: bearer(forged({"alg": "none"}, claims(), h.SECRET.encode())),
    "HS512 with the secret": lambda: bearer(forged({"alg": "HS512", "typ": "JWT"}, claims(),
                                                   h.SECRET.encode(), "sha512")),
    "missing account": lambda: h.auth(account=None),
    "empty account": lambda: h.auth(account=""),
    "account not a string": lambda: bearer(forged({"alg": "HS256", "typ": "JWT"},
                                                  claims(account=["acme"]), h.SECRET.encode())),
    "missing exp": lambda: bearer(forged({"alg": "HS256", "typ": "JWT"},
                                         {"sub": "m", "account": h.ACCOUNT}, h.SECRET.encode())),
    "missing sub": lambda: bearer(forged({"alg": "HS256", "typ": "JWT"},
                                         {"account": h.ACCOUNT, "exp": int(time.time()) + 60},
                                         h.SECRET.encode())),
}


@pytest.mark.parametrize("name", list(HS256_ATTACKS))
def test_bad_tokens_are_401_and_change_nothing(api: h.Api, conn: Conn, victim: uuid.UUID,
                                               name: str) -> None:
    attack(api, conn, victim, HS256_ATTACKS[name](), 401)


def test_another_accounts_broadcast_is_404_like_an_unknown_id(api: h.Api, conn: Conn,
                                                              victim: uuid.UUID) -> None:
    attack(api, conn, victim, h.auth(account="intruder"), 404)
    # and the owner still sees it
    r = api.get(f"/broadcasts/{victim}", headers=h.auth())
    assert r.status_code == 200 and r.json()["status"] == "sending"
    listed = api.get("/broadcasts", headers=h.auth(account="intruder")).json()["broadcasts"]
    assert [b["subject"] for b in listed] == ["x"]  # only its own


def test_audience_and_issuer_are_checked_when_configured(db_url: str, conn: Conn,
                                                         victim: uuid.UUID) -> None:
    s = h.settings(PGCAST_JWT_AUDIENCE="pgcast", PGCAST_JWT_ISSUER="https://id.example.com")
    with h.client(db_url, s) as api:
        for bad in (h.auth(aud="other", iss="https://id.example.com"),
                    h.auth(iss="https://id.example.com"),  # no aud
                    h.auth(aud="pgcast", iss="https://evil.example.com"),
                    h.auth(aud="pgcast")):  # no iss
            attack(api, conn, victim, bad, 401)
        good = h.auth(aud="pgcast", iss="https://id.example.com")
        assert api.get(f"/broadcasts/{victim}/progress", headers=good).status_code == 200


def _pem(public: Any) -> str:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_rs256_rejects_hs256_signed_with_the_public_key(db_url: str, conn: Conn,
                                                        victim: uuid.UUID) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = _pem(private.public_key())
    s = h.settings(PGCAST_JWT_PUBLIC_KEY=pem)
    assert s.algorithm == "RS256"
    with h.client(db_url, s) as api:
        confused = forged({"alg": "HS256", "typ": "JWT"}, claims(), pem.encode())
        attack(api, conn, victim, bearer(confused), 401)
        attack(api, conn, victim, h.auth(), 401)  # HS256 with the old secret
        attack(api, conn, victim, bearer(forged({"alg": "none"}, claims(), None)), 401)
        good = bearer(h.token(key=private, algorithm="RS256"))
        assert api.post(f"/broadcasts/{victim}/pause", headers=good).json()["success"] is True


@pytest.mark.parametrize("kind", ["es256", "eddsa"])
def test_ec_and_eddsa_keys_pin_their_algorithm(db_url: str, conn: Conn, victim: uuid.UUID,
                                               kind: str) -> None:
    private: Any = (ec.generate_private_key(ec.SECP256R1()) if kind == "es256"
                    else ed25519.Ed25519PrivateKey.generate())
    s = h.settings(PGCAST_JWT_PUBLIC_KEY=_pem(private.public_key()))
    assert s.algorithm == {"es256": "ES256", "eddsa": "EdDSA"}[kind]
    with h.client(db_url, s) as api:
        good = bearer(h.token(key=private, algorithm=s.algorithm))
        assert api.get(f"/broadcasts/{victim}", headers=good).status_code == 200
        attack(api, conn, victim, h.auth(), 401)


def test_public_key_from_a_file(tmp_path: Any) -> None:
    key = tmp_path / "jwt.pem"
    key.write_text(_pem(rsa.generate_private_key(public_exponent=65537,
                                                 key_size=2048).public_key()))
    assert h.settings(PGCAST_JWT_PUBLIC_KEY=str(key)).algorithm == "RS256"


@pytest.mark.parametrize("env, message", [
    ({}, "set PGCAST_JWT_SECRET"),
    ({"PGCAST_JWT_SECRET": "x" * 31}, "at least 32 bytes"),
    ({"PGCAST_JWT_SECRET": "x" * 32, "PGCAST_JWT_PUBLIC_KEY": "pem"}, "not both"),
    ({"PGCAST_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnope\n"}, "not a PEM"),
    ({"PGCAST_JWT_SECRET": "x" * 32, "PGCAST_JWT_ALGORITHM": "none"}, "does not fit"),
    ({"PGCAST_JWT_SECRET": "x" * 32, "PGCAST_JWT_ALGORITHM": "RS256"}, "does not fit"),
])
def test_unusable_configuration_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        config.from_env(env)


def test_pgcast_api_refuses_a_short_secret(db_url: str) -> None:
    env = support.pgcast_env(db_url, PGCAST_JWT_SECRET="short")
    done = support.pgcast(db_url, "api", "--port", str(support.free_port()), env=env, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == ("pgcast: error: PGCAST_JWT_SECRET must be at least 32 bytes "
                                   "(got 5)")


def test_pgcast_token_is_accepted_by_the_api(db_url: str, conn: Conn, victim: uuid.UUID) -> None:
    env = support.pgcast_env(db_url, PGCAST_JWT_SECRET=h.SECRET)
    done = support.pgcast(db_url, "token", "--account", h.ACCOUNT, "--sub", "demo", "--ttl", "60",
                          env=env)
    with h.client(db_url) as api:
        r = api.get(f"/broadcasts/{victim}/progress", headers=bearer(done.stdout.strip()))
    assert r.status_code == 200 and r.json()["total"] == 5
