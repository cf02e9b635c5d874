"""Issue 28: the sign-up pages' per-client limit behind a reverse proxy (PGCAST_TRUSTED_PROXIES).

The real app through httpx's ASGI transport, whose peer address is 127.0.0.1.
"""

from __future__ import annotations

import pytest

from pgcast.api import app as api_app
from pgcast.sql import errors as sql_errors
from tests import support
from tests.integration import test_api_helpers as h

URLENCODED = {"Content-Type": "application/x-www-form-urlencoded"}
FORM = "00000000-0000-4000-8000-0000000000aa"  # no such form: a refused POST still counts


def _codes(public: h.Api, forwarded: str | None, n: int) -> list[int]:
    headers = {**URLENCODED, **({"X-Forwarded-For": forwarded} if forwarded else {})}
    return [public.post(f"/f/{FORM}", content=b"email=x", headers=headers).status_code
            for _ in range(n)]


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCAST_FORM_RATE", "2")
    monkeypatch.setenv("PGCAST_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")
    with h.client(db_url) as public:
        assert _codes(public, "203.0.113.1", 3) == [404, 404, 429]
        assert _codes(public, "203.0.113.2", 2) == [404, 404]  # another client
        # what the client wrote itself (left of the proxies' entries) proves nothing
        assert _codes(public, "198.51.100.7, 203.0.113.1", 1) == [429]
        assert _codes(public, "203.0.113.2, 10.1.2.3", 1) == [429]  # a second proxy of ours
        # no header from a trusted proxy: counted as the proxy
        assert _codes(public, None, 3) == [404, 404, 429]


def test_without_trusted_proxies_the_header_is_ignored(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCAST_FORM_RATE", "2")
    monkeypatch.delenv("PGCAST_TRUSTED_PROXIES", raising=False)
    with h.client(db_url) as public:
        assert _codes(public, "203.0.113.1", 2) == [404, 404]
        assert _codes(public, "203.0.113.2", 1) == [429]  # the same peer, whatever it says
    # a proxy that is not ours is not believed either
    monkeypatch.setenv("PGCAST_TRUSTED_PROXIES", "10.0.0.0/8")
    with h.client(db_url) as public:
        assert _codes(public, "203.0.113.1", 2) == [404, 404]
        assert _codes(public, "203.0.113.2", 1) == [429]


def test_a_malformed_setting_stops_the_api_at_start(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCAST_TRUSTED_PROXIES", "10.0.0.0/8, proxy.example.com")
    with pytest.raises(sql_errors.InvalidInput, match="proxy.example.com"):
        api_app.create_app(h.settings(), db_url)
    r = support.pgcast(db_url, "api", "--port", str(support.free_port()),
                       env=support.pgcast_env(db_url, PGCAST_TRUSTED_PROXIES="nonsense",
                                              PGCAST_JWT_SECRET=h.SECRET), check=False)
    assert r.returncode == 2 and "PGCAST_TRUSTED_PROXIES: 'nonsense'" in r.stderr
