"""Opens and clicks end to end: a real worker renders, the real app redirects and records,
Postgres holds the links, the events and the report (issue 29)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcast.api import tracking_events
from pgcast.mail import tracking, unsubscribe
from pgcast.sql import broadcasts, contacts, retention
from tests import support
from tests.integration import test_api_helpers as h
from tests.unit.test_tracking import EXPECTED, HTML, TEXT

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT
BASE = "https://mail.example.org"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")
APPLE_MPP = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
             "(KHTML, like Gecko)")


def send(conn: Conn, db_url: str, tmp_path: Path, track: str, html: str = HTML,
         text: str = TEXT) -> tuple[uuid.UUID, dict[str, str]]:
    """A broadcast to ann and bob, sent by a real worker: its id and each one's HTML part."""
    conn.execute("INSERT INTO contacts (account, email, name, attributes) VALUES "
                 "(%s, 'ann@example.com', 'Ann', '{\"code\": \"a1\"}'), "
                 "(%s, 'bob@example.com', 'Bob', '{\"code\": \"b2\"}') "
                 "ON CONFLICT DO NOTHING", (A, A))
    row = broadcasts.create(conn, A, subject="Hi", from_address="news@example.com",
                            text=text, html=html, track=track)
    broadcasts.send(conn, A, row["id"])
    outbox = tmp_path / f"outbox-{row['id']}"
    support.pgcast(db_url, "worker", "--once", env=support.pgcast_env(
        db_url, PGCAST_PROVIDER="file", PGCAST_OUTBOX_DIR=str(outbox), PGCAST_PUBLIC_URL=BASE))
    parts = {}
    for r in conn.execute("SELECT id, email FROM contacts WHERE account = %s", (A,)):
        eml = outbox / str(row["id"]) / f"{r['id']}.eml"
        parsed = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        body = parsed.get_body(preferencelist=("html",))
        assert body is not None
        parts[r["email"]] = str(body.get_content())  # type: ignore[attr-defined]
    return uuid.UUID(str(row["id"])), parts


def tokens(part: str, kind: str) -> list[str]:
    return re.findall(re.escape(BASE) + f"/{kind}/([A-Za-z0-9_-]+)", part)


def keys(conn: Conn) -> unsubscribe.Keys:
    row = conn.execute("SELECT secret FROM unsubscribe_keys").fetchone()
    assert row is not None
    return unsubscribe.Keys((row["secret"],))


def forge(k: unsubscribe.Keys, bid: uuid.UUID, link: int | None, contact: int | None) -> str:
    """A token made with the real key, as pgcast makes them (what no message ever held)."""
    made = tracking.Tracker(str(bid), "contact" if contact else "aggregate",
                            (), k, BASE)._maker(contact or 0)
    return made(tracking.KIND_CLICK if link is not None else tracking.KIND_OPEN, link)


def test_a_click_redirects_to_the_stored_url_and_a_bad_token_never_redirects(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    bid, parts = send(conn, db_url, tmp_path, "contact")
    stored = [r["url"] for r in conn.execute(
        "SELECT url FROM broadcast_links WHERE broadcast_id = %s ORDER BY idx", (bid,))]
    assert stored == EXPECTED  # exactly what the template wrote, stored once
    ann = tokens(parts["ann@example.com"], "c")
    assert len(ann) == 6 and len(tokens(parts["ann@example.com"], "o")) == 1
    other, _ = send(conn, db_url, tmp_path, "contact",
                    html='<a href="https://other.example/only">x</a>', text=None)  # type: ignore[arg-type]
    k = keys(conn)
    with h.client(db_url) as public:
        for token in ann:
            r = public.get(f"/c/{token}?url=https://evil.example/")
            assert r.status_code == 302, r.text
            assert r.headers["location"] == tracking.location(
                stored[tracking.read(k, token).link or 0])
            assert r.headers["cache-control"] == "no-store, private"
            assert r.headers["referrer-policy"] == "no-referrer"
        assert public.get(f"/c/{ann[1]}").headers["location"] \
            == "https://example.com/caf%C3%A9?q=%C3%BCber&z"
        good = ann[3]
        bad = [good[:-1], good[:20], good[:-2] + ("A" if good[-2] != "A" else "B"),
               good + "A", "forged-token", tokens(parts["ann@example.com"], "o")[0],
               # the other broadcast's id in this token: the signature no longer matches
               tracking._b64(bytes([tracking.read(k, good).kind | 0x18]) + other.bytes
                             + __import__("base64").urlsafe_b64decode(good + "==")[17:]),
               # signed by us for the other broadcast, a link it does not have
               forge(k, other, 3, 1), forge(k, uuid.uuid4(), 0, 1)]
        for token in bad:
            r = public.get(f"/c/{token}")
            assert r.status_code == 404 and "location" not in r.headers, token
            assert r.headers["content-type"].startswith("text/html")
            assert "Link not found" in r.text
        assert public.get(f"/c/{forge(k, other, 0, 1)}").headers["location"] \
            == "https://other.example/only"
        assert public.get(f"/o/{good}").status_code == 404  # a click token is no open
        r = public.get(f"/o/{tokens(parts['bob@example.com'], 'o')[0]}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/gif"


def test_stats_count_people_and_machines_and_an_erase_removes_the_persons_events(
        conn: Conn, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking_events, "QUICK", 0.0)  # clicks right after the send count
    bid, parts = send(conn, db_url, tmp_path, "contact")
    ann, bob = parts["ann@example.com"], parts["bob@example.com"]
    human = {"User-Agent": CHROME}
    with h.client(db_url) as public:
        for token in (tokens(ann, "c")[0], tokens(ann, "c")[0], tokens(bob, "c")[1]):
            assert public.get(f"/c/{token}", headers=human).status_code == 302
        assert public.get(f"/o/{tokens(ann, 'o')[0]}",
                          headers={"User-Agent": APPLE_MPP}).status_code == 200
        assert public.get(f"/o/{tokens(bob, 'o')[0]}", headers=human).status_code == 200
        # a scanner: every link of the message at once
        for token in tokens(bob, "c"):
            assert public.get(f"/c/{token}", headers=human).status_code == 302
        unsub = re.findall(re.escape(BASE) + "/u/([A-Za-z0-9_-]+)", bob)[0]
        assert public.post(f"/u/{unsub}", content=b"List-Unsubscribe=One-Click", headers={
            "Content-Type": "application/x-www-form-urlencoded"}).status_code == 200
    # the lifespan's end wrote the buffer
    with h.client(db_url) as api:
        api.headers.update(h.auth())
        stats = api.get(f"/broadcasts/{bid}/stats").json()
        assert api.get(f"/broadcasts/{uuid.uuid4()}/stats").status_code == 404
    assert stats["track"] == "contact" and stats["sent"] == 2 and stats["total"] == 2
    assert stats["unsubscribed"] == 1 and stats["bounced"] == 0
    assert stats["opens"] == {"total": 2, "human": 1, "machine": 1, "unique": 1}
    # ann twice on link 0; bob on link 1 and then on every link within two seconds: all
    # seven of bob's are a scanner's
    assert stats["clicks"] == {"total": 9, "human": 2, "machine": 7, "unique": 1}
    first = stats["links"][0]
    # the first link is twice in the message: bob's scanner followed both
    assert first == {"index": 0, "url": EXPECTED[0], "clicks": 4, "human": 2, "machine": 2,
                     "unique": 1}
    assert [link["url"] for link in stats["links"]] == EXPECTED
    assert {(s["kind"], s["human"], s["machine"]) for s in stats["series"]} == {
        ("open", 1, 1), ("click", 2, 7)}
    ann_id = conn.execute("SELECT id FROM contacts WHERE email = 'ann@example.com'"
                          ).fetchone()["id"]  # type: ignore[index]
    named = "SELECT (SELECT count(*) FROM tracking_events WHERE contact_id = %(c)s) " \
            "+ (SELECT count(*) FROM tracking_firsts WHERE contact_id = %(c)s) AS n"
    assert conn.execute(named, {"c": ann_id}).fetchone() == {"n": 3 + 2}  # events, firsts
    contacts.erase(conn, A, "ann@example.com", source="cli", actor={})
    assert conn.execute(named, {"c": ann_id}).fetchone() == {"n": 0}
    assert conn.execute("SELECT count(*) AS n FROM tracking_events").fetchone() == {"n": 8}
    # the counts stay (they name nobody)
    with h.client(db_url) as api:
        api.headers.update(h.auth())
        assert api.get(f"/broadcasts/{bid}/stats").json()["clicks"]["total"] == 9


def test_aggregate_mode_writes_no_row_naming_a_contact(
        conn: Conn, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking_events, "QUICK", 0.0)
    bid, parts = send(conn, db_url, tmp_path, "aggregate")
    ann = parts["ann@example.com"]
    refs = [tracking.read(keys(conn), t) for t in tokens(ann, "c") + tokens(ann, "o")]
    assert refs and all(r.contact_id is None for r in refs)
    ann_id = conn.execute("SELECT id FROM contacts WHERE email = 'ann@example.com'"
                          ).fetchone()["id"]  # type: ignore[index]
    with h.client(db_url) as public:
        for token in [*tokens(ann, "c")[:2], tokens(ann, "o")[0],
                      # a token naming a contact (made with the real key): not kept either
                      forge(keys(conn), bid, 0, ann_id), forge(keys(conn), bid, None, ann_id)]:
            assert public.get(f"/{'o' if tracking.read(keys(conn), token).link is None else 'c'}"
                              f"/{token}", headers={"User-Agent": CHROME}).status_code in (200, 302)
        # a HEAD redirects too, and is a scanner's
        r = public.request("HEAD", f"/c/{tokens(ann, 'c')[2]}", headers={"User-Agent": CHROME})
        assert r.status_code == 302 and r.headers["location"] == tracking.location(EXPECTED[2])
    assert conn.execute("SELECT count(*) AS n FROM tracking_events").fetchone() == {"n": 6}
    assert conn.execute("SELECT count(*) AS n FROM tracking_events WHERE contact_id IS NOT NULL"
                        ).fetchone() == {"n": 0}
    assert conn.execute("SELECT count(*) AS n FROM tracking_firsts").fetchone() == {"n": 0}
    stats = broadcasts_stats(conn, bid)
    assert stats["opens"] == {"total": 2, "human": 2, "machine": 0, "unique": None}
    # ann's message: links 0, 1 and (HEAD) 2 within two seconds, a scanner's burst even in
    # aggregate mode (the message's random number, held in memory only); the forged token
    # is another "message"
    assert stats["clicks"] == {"total": 4, "human": 1, "machine": 3, "unique": None}


def broadcasts_stats(conn: Conn, bid: uuid.UUID) -> dict[str, Any]:
    from pgcast.sql import tracking as sql_tracking

    return sql_tracking.stats(conn, A, bid)


def test_links_are_stored_once_whoever_comes_first(conn: Conn, db_url: str) -> None:
    bid = broadcasts.create(conn, A, subject="Hi", from_address="news@example.com",
                            text="x", track="contact")["id"]
    lists = [[f"https://example.com/{i}" for i in range(50)]] * 4
    lists += [list(reversed(lists[0]))] * 4  # a worker of another version
    got: list[list[tuple[int, str]]] = []
    barrier = threading.Barrier(len(lists))

    def store(urls: list[str]) -> None:
        with psycopg.connect(db_url, autocommit=True) as c:
            barrier.wait()
            got.append([tuple(r) for r in c.execute(  # type: ignore[misc]
                "SELECT idx, url FROM pgcast_links_store_v1(%s, %s)", (bid, urls))])

    threads = [threading.Thread(target=store, args=(u,)) for u in lists]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(lists) and all(g == got[0] for g in got)
    assert [u for _, u in got[0]] in (lists[0], lists[-1])
    assert [i for i, _ in got[0]] == list(range(50))


def test_retention_drops_old_months_and_keeps_the_counts(conn: Conn) -> None:
    bid = broadcasts.create(conn, A, subject="Hi", from_address="news@example.com",
                            text="x", track="aggregate")["id"]
    conn.execute("SELECT pgcast_track_v1(%s, %s, %s, %s, %s, %s, 'pgcast')",
                 ([bid, bid], ["2020-01-15T00:00:00Z", "now"], ["open", "open"], [None, None],
                  [None, None], [False, False]))
    parts = {r["relname"] for r in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'tracking_events'::regclass")}
    assert "tracking_events_202001" in parts and len(parts) == 2
    report = retention.run(conn, 90 * 86400.0)
    assert report.summary()["tracking_months"] == 1
    assert conn.execute("SELECT count(*) AS n FROM tracking_events").fetchone() == {"n": 1}
    assert broadcasts_stats(conn, bid)["opens"]["total"] == 2


def test_the_account_default_and_the_cli(conn: Conn, db_url: str) -> None:
    def pgcast(*args: str) -> str:
        return support.pgcast(db_url, *args).stdout

    assert '"mode": "none"' in pgcast("tracking", "default", A)
    pgcast("tracking", "default", A, "aggregate")
    bid = broadcasts.create(conn, A, subject="Hi", from_address="news@example.com",
                            text="x")["id"]
    own = broadcasts.create(conn, A, subject="Hi", from_address="news@example.com",
                            text="x", track="contact")["id"]
    other = broadcasts.create(conn, "elsewhere", subject="Hi",
                              from_address="news@example.com", text="x")["id"]
    tracks = {r["id"]: r["track"] for r in conn.execute("SELECT id, track FROM broadcasts")}
    assert (tracks[bid], tracks[own], tracks[other]) == ("aggregate", "contact", "none")
    with h.client(db_url) as api:  # a copy keeps the mode
        api.headers.update(h.auth())
        copied = api.post(f"/broadcasts/{own}/copy").json()
        assert copied["track"] == "contact", copied
        made = api.post("/broadcasts", json={"subject": "S", "from": "news@example.com",
                                             "text": "x", "track": "none"}).json()
        assert made["track"] == "none"
        bad = api.post("/broadcasts", json={"subject": "S", "from": "news@example.com",
                                            "text": "x", "track": "everything"})
        assert bad.status_code == 422 and "track" in bad.json()["message"]
    out = pgcast("broadcast", "stats", str(bid), "--account", A)
    assert '"track": "aggregate"' in out and '"opens"' in out
    bad = support.pgcast(db_url, "tracking", "default", A, "everything", check=False)
    assert bad.returncode == 2


def test_ses_open_and_click_events_land_with_pgcast_s_own(db_url: str, conn: Conn) -> None:
    from pgcast.api import tracking as tracking_routes
    from tests import snsmessages as m
    from tests.integration.test_feedback_webhook import Hook, feedback

    support.seed_contacts(conn, 2, account=A)
    bid = broadcasts.create(conn, A, subject="Hi", from_address="news@example.com",
                            text="x", track="contact")["id"]
    broadcasts.send(conn, A, bid)
    urls = ["https://example.com/a?b=1&c=2", "https://example.com/z"]
    conn.execute("SELECT * FROM pgcast_links_store_v1(%s, %s)", (bid, urls))
    cid = conn.execute("SELECT min(id) AS id FROM contacts").fetchone()["id"]  # type: ignore[index]
    sent = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    later = (dt.datetime.now(dt.UTC)).isoformat().replace("+00:00", "Z")

    def event(kind: str, **detail: Any) -> dict[str, Any]:
        ev = m.ses_event(kind, "user0@example.com", broadcast=bid, contact=cid, at=sent)
        ev[kind.lower()] = {"timestamp": later, "userAgent": CHROME, **detail}
        return ev

    with h.client(db_url) as api:
        api.app.state.feedback = feedback(m.Fetcher())
        hook = Hook(api, m.Fetcher())
        opened = m.notification(event("Open"))
        for msg in (opened, opened,  # SNS delivers it again: counted once
                    m.notification(event("Click", link=urls[0])),
                    m.notification(event("Click", link=f"{BASE}/c/abc")),  # pgcast's own
                    m.notification(event("Click", link="https://unknown.example/"))):
            assert hook.post(msg).status_code == 200
        api.portal.call(tracking_routes.close, api.app)  # write the buffer now
    rows = conn.execute("SELECT kind, link, contact_id, machine, source FROM tracking_events "
                        "ORDER BY kind").fetchall()
    assert rows == [{"kind": "click", "link": 0, "contact_id": cid, "machine": False,
                     "source": "ses"},
                    {"kind": "open", "link": None, "contact_id": cid, "machine": False,
                     "source": "ses"}]


def test_segments_by_activity_select_who_opened_or_clicked_in_contact_mode(
        conn: Conn, db_url: str) -> None:
    from pgcast.sql import segments

    support.seed_contacts(conn, 4, account=A)
    ids = [r["id"] for r in conn.execute("SELECT id FROM contacts ORDER BY id")]
    tracked = broadcasts.create(conn, A, subject="Hi", from_address="news@example.com",
                                text="x", track="contact")["id"]
    counted = broadcasts.create(conn, A, subject="Hi", from_address="news@example.com",
                                text="x", track="aggregate")["id"]
    plain = broadcasts.create(conn, A, subject="Hi", from_address="news@example.com",
                              text="x")["id"]
    # ids[0] opened and clicked, ids[1] opened, ids[2] only a machine's click
    conn.execute("SELECT pgcast_track_v1(%s, %s, %s, %s, %s, %s, 'pgcast')", (
        [tracked] * 4, ["now"] * 4, ["open", "click", "open", "click"], [None, 0, None, 1],
        [ids[0], ids[0], ids[1], ids[2]], [False, False, False, True]))

    def who(f: Any) -> set[int]:
        return {r["id"] for r in conn.execute(
            "SELECT id FROM pgcast_segment_contacts_v2(%s, %s::jsonb)",
            (A, psycopg.types.json.Jsonb(f)))}

    assert who({"opened": str(tracked)}) == {ids[0], ids[1]}
    assert who({"clicked": str(tracked)}) == {ids[0]}
    assert who({"all": [{"opened": str(tracked)}, {"not": {"clicked": str(tracked)}}]}) \
        == {ids[1]}
    assert segments.count(conn, A, {"any": [{"clicked": str(tracked)}, {"tag": "none"}]}) == 1
    for other, mode in ((counted, "aggregate"), (plain, "none")):
        with pytest.raises(Exception) as exc:
            segments.count(conn, A, {"all": [{"opened": str(other)}]})
        assert str(exc.value).startswith("$.all[0].opened: ") \
            and f"did not track opens and clicks per contact (its tracking mode is {mode}" \
            in str(exc.value)
    # a send to a segment by activity snapshots exactly those contacts
    follow = broadcasts.create(conn, A, subject="Again", from_address="news@example.com",
                               text="x", filter_value={"not": {"opened": str(tracked)}})
    assert broadcasts.send(conn, A, follow["id"])["queued"] == 2
    got = {r["contact_id"] for r in conn.execute(
        "SELECT contact_id FROM broadcast_recipients WHERE broadcast_id = %s", (follow["id"],))}
    assert got == {ids[2], ids[3]}
    with h.client(db_url) as api:
        api.headers.update(h.auth())
        r = api.post("/segments/count", json={"filter": {"opened": str(counted)}})
        assert r.status_code == 422 and "did not track" in r.json()["message"]
        r = api.post("/segments/count", json={"filter": {"opened": str(tracked)}})
        assert r.status_code == 200 and r.json() == {"count": 2}


@pytest.mark.parametrize("first", ["record", "erase"])
def test_an_erase_and_a_batch_of_events_at_once_leave_no_event_of_the_person(
        conn: Conn, db_url: str, first: str) -> None:
    support.seed_contacts(conn, 2, account=A)
    bid = broadcasts.create(conn, A, subject="Hi", from_address="news@example.com",
                            text="x", track="contact")["id"]
    ids = [r["id"] for r in conn.execute("SELECT id FROM contacts ORDER BY id")]
    record = ("SELECT pgcast_track_v1(%s, %s, %s, %s, %s, %s, 'pgcast')",
              ([bid] * 2, ["now"] * 2, ["open"] * 2, [None] * 2, ids, [False] * 2))
    erase = ("SELECT * FROM pgcast_erase_v6(%s, 'user0@example.com', 'cli', '{}')", (A,))
    done = threading.Event()
    with psycopg.connect(db_url) as holder, psycopg.connect(db_url, autocommit=True) as other:
        holder.execute(*(record if first == "record" else erase))  # not committed yet
        second = erase if first == "record" else record
        waiter = threading.Thread(target=lambda: (other.execute(*second), done.set()))
        waiter.start()
        support.wait_for(lambda: conn.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        ).fetchone()["n"] == 1, timeout=30, what="the second to wait")  # type: ignore[index]
        assert not done.is_set()
        holder.commit()
        waiter.join(timeout=30)
        assert done.is_set()
    rows = conn.execute("SELECT contact_id FROM tracking_events").fetchall()
    assert rows == [{"contact_id": ids[1]}]  # the other contact's open only
    assert conn.execute("SELECT contact_id FROM tracking_firsts").fetchall() == rows
