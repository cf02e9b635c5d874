"""Review of opens and clicks (issue 29): what one API process keeps in memory for the
redirect is bounded however many broadcasts a tenant makes clickable."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcast.api import tracking as tracking_routes
from pgcast.api import tracking_events
from pgcast.mail import tracking
from pgcast.sql import broadcasts
from pgcast.sql import tracking as sql_tracking
from tests.integration import test_api_helpers as h
from tests.integration.test_tracking import CHROME, forge, keys, send, tokens

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT
REPEATS = 10  # events of one token a minute that count (tracking_events.REPEATS)


def test_the_redirect_s_link_cache_is_bounded_by_size_not_only_by_broadcasts(
        conn: Conn, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tenant may store up to 500 links of 2,048 bytes per broadcast: 1,024 such broadcasts
    # cached by count alone is gigabytes in the API process (each link kept twice: the URL
    # and its Location). Scaled down: a budget of 200,000 characters, broadcasts of ~80,000.
    monkeypatch.setattr(tracking_routes, "CACHE_CHARS", 200_000, raising=False)
    made: list[tuple[uuid.UUID, list[str]]] = []
    for b in range(8):
        bid = uuid.UUID(str(broadcasts.create(conn, A, subject="Hi",
                                              from_address="news@example.com",
                                              text="x", track="contact")["id"]))
        urls = [f"https://example.com/{b}/{i}/" + "x" * 1980 for i in range(20)]
        conn.execute("SELECT * FROM pgcast_links_store_v1(%s, %s)", (bid, urls))
        made.append((bid, urls))
    k = keys(conn)
    with h.client(db_url) as public:
        for _ in range(2):  # evicted broadcasts are read again and still redirect
            for bid, urls in made:
                r = public.get(f"/c/{forge(k, bid, 7, 1)}")
                assert r.status_code == 302
                assert r.headers["location"] == tracking.location(urls[7])
                cache = public.app.state.tracking_links
                held = sum(len(u or "") + len(loc or "") for _, us, locs in cache.values()
                           for u, loc in zip(us, locs, strict=True))
                assert held <= 200_000, (len(cache), held)
        assert 1 <= len(public.app.state.tracking_links) < len(made)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/c/%2e%2e/broadcasts"), ("GET", "/c/..%2Fbroadcasts"), ("GET", "/c//broadcasts"),
    ("GET", "/c/x/%2e%2e/%2e%2e/broadcasts"), ("HEAD", "/o/%2e%2e%2fbroadcasts"),
    ("POST", "/c/%2e%2e/broadcasts"), ("GET", "/u/..%2f..%2fbroadcasts"),
    ("GET", "/cx"), ("GET", "/c"), ("GET", "/c/"), ("GET", "/o/"),
    ("GET", "/broadcasts/00000000-0000-0000-0000-000000000000/stats")])
def test_the_fast_path_and_public_prefixes_reach_no_private_route(
        db_url: str, method: str, path: str) -> None:
    # /c/ and /o/ skip the JWT middleware: a path that only looks like one of them (encoded
    # dots or slashes, a longer first segment) must never reach a tenant's data unsigned
    with h.client(db_url) as public:
        r = public.request(method, path)
    assert r.status_code in (401, 404, 405), r.text
    assert "location" not in r.headers


def test_a_flood_on_one_token_writes_a_bounded_number_of_events(
        conn: Conn, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Anyone who got one message holds its tokens: a loop on its pixel or one of its links
    # wrote a row per request into tracking_events (and into the totals), without bound.
    monkeypatch.setattr(tracking_events, "QUICK", 0.0)
    bid, parts = send(conn, db_url, tmp_path, "contact")
    ann, bob = parts["ann@example.com"], parts["bob@example.com"]
    human = {"User-Agent": CHROME}
    with h.client(db_url) as public:
        for _ in range(40):
            assert public.get(f"/o/{tokens(ann, 'o')[0]}", headers=human).status_code == 200
            r = public.get(f"/c/{tokens(ann, 'c')[0]}", headers=human)
            assert r.status_code == 302  # the redirect always answers
        assert public.get(f"/o/{tokens(bob, 'o')[0]}", headers=human).status_code == 200
    stats = sql_tracking.stats(conn, A, bid)
    assert stats["opens"]["total"] == REPEATS + 1
    assert stats["opens"]["unique"] == 2
    assert stats["clicks"]["total"] == REPEATS
    assert conn.execute("SELECT count(*) AS n FROM tracking_events").fetchone() == {
        "n": 2 * REPEATS + 1}


def test_another_account_cannot_read_a_broadcast_s_stats(conn: Conn, db_url: str) -> None:
    bid = broadcasts.create(conn, A, subject="Hi", from_address="news@example.com", text="x",
                            track="contact")["id"]
    with h.client(db_url) as api:
        mine = api.get(f"/broadcasts/{bid}/stats", headers=h.auth(A))
        theirs = api.get(f"/broadcasts/{bid}/stats", headers=h.auth("someone-else"))
        nobody = api.get(f"/broadcasts/{bid}/stats")
    assert mine.status_code == 200 and mine.json()["track"] == "contact"
    assert theirs.status_code == 404 and "track" not in theirs.text
    assert nobody.status_code == 401
