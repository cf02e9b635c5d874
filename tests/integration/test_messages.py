"""Transactional messages (issue 26): the outbox in the caller's transaction, idempotency,
the fence (suppressed, erased, unsubscribed for marketing only), in-doubt rows, NOTIFY."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from pgcast.worker import control, engine, providers
from tests import support

Conn = psycopg.Connection[dict[str, Any]]

SEND = ("SELECT pgcast_send_message(%s, %s, 'Your receipt', 'Thanks!', NULL, "
        "'Shop <shop@example.com>', %s) AS id")
SEND_CAT = ("SELECT pgcast_send_message(%s, %s, 'Hello', 'Hi', NULL, "
            "'shop@example.com', NULL, %s) AS id")


def send(conn: Conn, to: str, key: str | None = None, account: str = "default") -> Any:
    row = conn.execute(SEND, (account, to, key)).fetchone()
    assert row is not None
    return row["id"]


def status(conn: Conn, mid: Any) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM message_status WHERE id = %s", (mid,)).fetchone()
    assert row is not None
    return row


def deliver(db_url: str, outbox: Path, **settings: Any) -> engine.Engine:
    """One worker's message loop, in process, until nothing is claimable (file provider)."""

    async def run() -> engine.Engine:
        async with AsyncConnectionPool(db_url, kwargs={"autocommit": True}, open=False) as pool:
            eng = engine.Engine(engine.Settings(once=True, **settings),
                                providers.FileProvider(outbox), pool)
            eng.state.rates["global"] = 0.0
            await eng.messages.run()
            return eng

    return asyncio.run(run())


def sent_files(outbox: Path) -> list[str]:
    folder = outbox / "messages"
    return sorted(p.stem for p in folder.glob("*.eml")) if folder.exists() else []


def test_a_message_enqueued_in_a_transaction_that_rolls_back_is_never_sent(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    with support.connect(db_url) as app:
        app.autocommit = False
        # the application's own change and its message, in one transaction
        app.execute("CREATE TABLE users (email text)")
        app.commit()
        app.execute("INSERT INTO users VALUES ('ann@example.com')")
        gone = send(app, "ann@example.com", "signup-ann")
        app.rollback()
        app.execute("INSERT INTO users VALUES ('bob@example.com')")
        kept = send(app, "bob@example.com", "signup-bob")
        app.commit()
    eng = deliver(db_url, tmp_path)
    assert eng.messages.counts.sent == 1
    assert sent_files(tmp_path) == [str(kept)]
    rows = conn.execute("SELECT id, status FROM messages").fetchall()
    assert [(r["id"], r["status"]) for r in rows] == [(kept, "sent")]
    assert gone != kept
    # the key of the rolled-back message is free: it names nothing
    assert conn.execute("SELECT count(*) AS n FROM messages WHERE idempotency_key = "
                        "'signup-ann'").fetchone() == {"n": 0}


def _blocked_on_a_lock(conn: Conn, pid: int) -> bool:
    row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                       (pid,)).fetchone()
    return row is not None and row["wait_event_type"] == "Lock"


@pytest.mark.parametrize("first_commits", [True, False], ids=["commit", "rollback"])
def test_the_same_key_from_two_sessions_at_once_gives_one_message(
        conn: Conn, db_url: str, first_commits: bool) -> None:
    with support.connect(db_url) as a, support.connect(db_url) as b:
        a.autocommit = b.autocommit = False
        first = send(a, "ann@example.com", "order-42")
        got: dict[str, Any] = {}

        def second() -> None:
            got["id"] = send(b, "ann@example.com", "order-42")
            b.commit()

        pid = b.info.backend_pid
        t = threading.Thread(target=second)
        t.start()
        # the second session waits on the first's row, inside its INSERT ... ON CONFLICT
        support.wait_for(lambda: _blocked_on_a_lock(conn, pid), timeout=30)
        if first_commits:
            a.commit()
        else:
            a.rollback()
        t.join(timeout=30)
        assert not t.is_alive()
    rows = conn.execute("SELECT id FROM messages WHERE idempotency_key = 'order-42'").fetchall()
    assert len(rows) == 1
    if first_commits:
        assert got["id"] == first == rows[0]["id"]
    else:  # the first never existed: the second made its own
        assert got["id"] == rows[0]["id"] != first


def test_the_same_key_again_returns_the_first_message_and_says_so(conn: Conn) -> None:
    params = {"account": "default", "to": "ann@example.com", "subject": "S", "text": "T",
              "html": None, "from": "shop@example.com", "key": "k1", "category": None,
              "reply_to": None, "headers": "{}", "tags": "{}", "notify": True}
    params["category"] = "transactional"
    from pgcast.sql.queries import QUERIES

    one = conn.execute(QUERIES["message_send"], params).fetchone()
    two = conn.execute(QUERIES["message_send"], {**params, "subject": "other"}).fetchone()
    assert one is not None and two is not None
    assert one["created"] is True and two["created"] is False and one["id"] == two["id"]
    # another account's same key is another message
    three = conn.execute(QUERIES["message_send"], {**params, "account": "acme"}).fetchone()
    assert three is not None and three["created"] is True and three["id"] != one["id"]


def test_a_message_to_a_suppressed_address_is_skipped(conn: Conn, db_url: str,
                                                      tmp_path: Path) -> None:
    conn.execute("INSERT INTO contacts (account, email) VALUES ('default', 'Ann@Example.com'), "
                 "('default', 'bob@example.com')")
    conn.execute("UPDATE contacts SET suppressed_at = now(), suppressed_reason = 'bounce' "
                 "WHERE email = 'Ann@Example.com'")
    ann = send(conn, "ann@example.com")
    bob = send(conn, "bob@example.com")
    deliver(db_url, tmp_path)
    assert status(conn, ann)["status"] == "skipped"
    assert status(conn, ann)["error"] == "suppressed: bounce"
    assert status(conn, bob)["status"] == "sent"
    assert sent_files(tmp_path) == [str(bob)]


def test_unsubscribes_apply_to_marketing_only(conn: Conn, db_url: str, tmp_path: Path) -> None:
    conn.execute("INSERT INTO contacts (account, email, unsubscribed_at) "
                 "VALUES ('default', 'ann@example.com', now())")
    ids = {c: conn.execute(SEND_CAT, ("default", "ann@example.com", c)).fetchone()["id"]  # type: ignore[index]
           for c in ("transactional", "marketing", "confirmation")}
    deliver(db_url, tmp_path)
    assert status(conn, ids["marketing"])["status"] == "skipped"
    assert status(conn, ids["marketing"])["error"] == "unsubscribed"
    assert status(conn, ids["transactional"])["status"] == "sent"
    assert status(conn, ids["confirmation"])["status"] == "sent"


def test_an_erased_address_is_never_stored_nor_sent(conn: Conn, db_url: str,
                                                    tmp_path: Path) -> None:
    queued = send(conn, "ann@example.com")
    conn.execute("SELECT * FROM pgcast_erase_v6('default', 'ann@example.com', 'api', '{}')")
    later = send(conn, "ANN@example.com")
    deliver(db_url, tmp_path)
    for mid in (queued, later):
        row = status(conn, mid)
        assert row["status"] == "skipped" and row["error"] == "contact erased", row
        assert row["to_address"] == "erased@erased.invalid"
    assert conn.execute("SELECT count(*) AS n FROM messages WHERE to_address ILIKE "
                        "'%ann@%' OR text_body LIKE '%Thanks%'").fetchone() == {"n": 0}
    assert sent_files(tmp_path) == []


def test_enqueue_refuses_what_cannot_be_sent(conn: Conn) -> None:
    conn.execute("INSERT INTO senders (account, sender) VALUES ('default', 'example.com')")
    bad = [("not-an-address", "shop@example.com", "to: not-an-address is not an email address"),
           ("ann@example.com", "Shop <shop@evil.test>",
            "from: shop@evil.test is not a sender this account may use")]
    for to, from_, why in bad:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=why):
            conn.execute("SELECT pgcast_send_message('default', %s, 'S', 'T', NULL, %s, NULL)",
                         (to, from_))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="category must be"):
        conn.execute(SEND_CAT, ("default", "ann@example.com", "urgent"))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="text or an html body"):
        conn.execute("SELECT pgcast_send_message('default', 'a@example.com', 'S', NULL, NULL, "
                     "'shop@example.com', NULL)")
    assert conn.execute("SELECT count(*) AS n FROM messages").fetchone() == {"n": 0}
    # a sender at the allowed domain passes
    send(conn, "ann@example.com")


def test_the_fence_refuses_a_stale_claim_and_a_lost_handoff_ends_unknown(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    mid = send(conn, "ann@example.com")
    stale = conn.execute("SELECT * FROM pgcast_message_claim_v1(10, gen_random_uuid(), 'w1', "
                         "interval '1 millisecond')").fetchall()
    assert [r["id"] for r in stale] == [mid]
    time.sleep(0.01)
    # its lease is over: claimable again, by another claim; the first claim's handoff is refused
    fresh = conn.execute("SELECT *, gen_random_uuid() AS t FROM "
                         "pgcast_message_claim_v1(10, '11111111-1111-1111-1111-111111111111', "
                         "'w2', interval '1 millisecond')").fetchall()
    assert [r["id"] for r in fresh] == [mid]
    assert conn.execute("SELECT * FROM pgcast_message_handoff_v2(gen_random_uuid(), %s)",
                        ([mid],)).fetchall() == []
    time.sleep(0.01)
    # a handoff under an expired lease is refused too
    assert conn.execute("SELECT * FROM pgcast_message_handoff_v2("
                        "'11111111-1111-1111-1111-111111111111', %s)", ([mid],)).fetchall() == []
    # a claim that hands off and whose worker dies: unknown after its lease, never re-sent
    token = "22222222-2222-2222-2222-222222222222"
    conn.execute("SELECT * FROM pgcast_message_claim_v1(10, %s, 'w3', interval '1 second')",
                 (token,))
    handed = conn.execute("SELECT * FROM pgcast_message_handoff_v2(%s, %s)",
                          (token, [mid])).fetchall()
    assert [r["id"] for r in handed] == [mid]
    support.wait_for(lambda: conn.execute("SELECT pgcast_message_sweep_v1() AS n").fetchone()
                     == {"n": 1}, timeout=10)
    row = status(conn, mid)
    assert row["status"] == "unknown" and "in doubt" in row["error"]
    deliver(db_url, tmp_path)
    assert sent_files(tmp_path) == [] and status(conn, mid)["status"] == "unknown"


def test_transient_failures_are_retried_and_throttles_are_not_attempts(conn: Conn) -> None:
    mid = send(conn, "ann@example.com")
    token = "33333333-3333-3333-3333-333333333333"
    for outcome, attempts in (("throttled", 0), ("retry", 1), ("sent", 2)):
        conn.execute("UPDATE messages SET not_before = now() WHERE id = %s", (mid,))
        conn.execute("SELECT * FROM pgcast_message_claim_v1(10, %s, 'w', interval '30 s')",
                     (token,))
        conn.execute("SELECT * FROM pgcast_message_handoff_v2(%s, %s)", (token, [mid]))
        conn.execute("SELECT pgcast_message_record_v2(%s, %s, %s, %s, %s, %s)",
                     (token, [mid], [outcome], ["ses-1" if outcome == "sent" else None],
                      [None if outcome == "sent" else "slow down"], [0.0]))
        row = status(conn, mid)
        assert row["attempts"] == attempts, (outcome, row)
    row = status(conn, mid)
    assert row["status"] == "sent" and row["provider_message_id"] == "ses-1" and not row["error"]


def test_feedback_annotates_a_message_by_its_provider_id(conn: Conn) -> None:
    mid = send(conn, "ann@example.com")
    conn.execute("UPDATE messages SET status = 'unknown', provider_message_id = 'ses-9' "
                 "WHERE id = %s", (mid,))
    got = conn.execute("SELECT pgcast_message_feedback_v1('ses-9', 'delivery', now(), NULL) "
                       "AS id").fetchone()
    assert got == {"id": mid}
    conn.execute("SELECT pgcast_message_feedback_v1('ses-9', 'complaint', now(), 'abuse')")
    row = status(conn, mid)
    assert row["status"] == "sent"  # SES had it: resolved
    assert row["delivered_at"] and row["complained_at"] and row["feedback_detail"] == "abuse"
    assert conn.execute("SELECT pgcast_message_feedback_v1('nope', 'delivery', now(), NULL) "
                        "AS id").fetchone() == {"id": None}


def test_a_committed_message_notifies_the_workers_once_a_transaction(db_url: str) -> None:
    with support.connect(db_url) as listener, support.connect(db_url) as app:
        listener.execute("LISTEN pgcast_control")
        app.autocommit = False
        send(app, "ann@example.com")
        send(app, "bob@example.com")
        app.rollback()
        send(app, "cy@example.com")
        send(app, "dee@example.com")
        app.commit()
        notes = list(listener.notifies(timeout=1.0))
    assert [n.payload for n in notes] == ['{"event": "message"}']
    state = engine.State()
    control.apply(state, notes[0].payload)
    assert state.messages.is_set() and not state.wake.is_set()


def listening(conn: Conn) -> bool:
    row = conn.execute("SELECT count(*) AS n FROM pg_stat_activity "
                       "WHERE query = 'LISTEN pgcast_control' "
                       "AND datname = current_database()").fetchone()
    return row is not None and row["n"] > 0


def test_a_committed_message_wakes_an_idle_worker(conn: Conn, db_url: str,
                                                  tmp_path: Path) -> None:
    """With a 60 s poll, only the NOTIFY can bring the message to the worker in time."""

    async def run() -> tuple[int, float]:
        async with AsyncConnectionPool(db_url, kwargs={"autocommit": True}, open=False) as pool:
            eng = engine.Engine(engine.Settings(poll=60.0), providers.FileProvider(tmp_path),
                                pool)
            eng.state.rates["global"] = 0.0
            listen = asyncio.create_task(control.listen(db_url, eng.state, eng.stopping))
            loop = asyncio.create_task(eng.messages.run())
            # listening, and idle: its looks (at the start, and after the listener connected)
            # found nothing
            while not await asyncio.to_thread(listening, conn):
                await asyncio.sleep(0.01)
            while not (eng.messages.idle and not eng.state.messages.is_set()):
                await asyncio.sleep(0.01)
            await asyncio.to_thread(send, conn, "ann@example.com")
            started = time.monotonic()
            while not sent_files(tmp_path):
                assert time.monotonic() - started < 30, "not sent: the NOTIFY was not taken"
                await asyncio.sleep(0.01)
            took = time.monotonic() - started
            eng.stopping.set()
            await asyncio.gather(listen, loop)
            return eng.messages.counts.woken, took

    woken, took = asyncio.run(run())
    assert woken == 1 and took < 30


def _bucket(conn: Conn, tokens: float, credit: float, share: float = 0.5) -> None:
    conn.execute("UPDATE rate_limits SET rate = 10, burst = 10, tokens = %s, "
                 "refilled_at = clock_timestamp(), messages_credit = %s, "
                 "messages_refilled_at = clock_timestamp(), messages_share = %s "
                 "WHERE name = 'global'", (tokens, credit, share))


def _take(conn: Conn, bid: Any, want: int) -> int:
    row = conn.execute("SELECT granted FROM pgcast_take_tokens_v4('global', %s, %s)",
                       (want, bid)).fetchone()
    assert row is not None
    return int(row["granted"])


def _take_messages(conn: Conn, want: int) -> int:
    row = conn.execute("SELECT granted FROM pgcast_take_tokens_external(%s)", (want,)).fetchone()
    assert row is not None
    return int(row["granted"])


def test_messages_take_tokens_ahead_of_broadcasts_up_to_their_share(conn: Conn) -> None:
    support.seed_contacts(conn, 1)
    bid = support.new_broadcast(conn)
    # no broadcast waiting: messages may take the whole bucket, whatever their credit
    _bucket(conn, tokens=8, credit=0)
    assert _take_messages(conn, 8) == 8
    # a broadcast waits (it asked for more than the bucket had)
    _bucket(conn, tokens=0, credit=0)
    assert _take(conn, bid, 100) == 0
    # messages wait too: they asked for 5 and got nothing (the bucket is empty)
    assert _take_messages(conn, 5) == 0
    # the bucket refills to 5; messages have earned 2.5 of credit meanwhile
    _bucket(conn, tokens=5, credit=2.5)
    conn.execute("UPDATE rate_limits SET messages_waiting_at = clock_timestamp(), "
                 "messages_want = 5 WHERE name = 'global'")
    # the broadcast's take leaves what the waiting messages are owed (their credit, 2.5)
    assert _take(conn, bid, 100) == 2
    # and the messages take it, capped by their credit while the broadcast waits
    assert _take_messages(conn, 5) == 2
    # share 0: messages take nothing while broadcasts wait
    _bucket(conn, tokens=10, credit=0, share=0)
    assert _take(conn, bid, 1) == 1  # the broadcast is still taking (and waiting)
    assert _take(conn, bid, 100) >= 8
    _bucket(conn, tokens=10, credit=0, share=0)
    assert _take_messages(conn, 5) == 0


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), None])
def test_a_messages_share_of_zero_is_refused(conn: Conn, bad: float | None) -> None:
    # 0 held messages back for as long as any broadcast waited: refused, as is anything
    # outside (0, 1]; the share stored is untouched
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="more than 0"):
        conn.execute("SELECT * FROM pgcast_messages_share_v2('global', %s)", (bad,))
    assert conn.execute("SELECT messages_share FROM rate_limits WHERE name = 'global'"
                        ).fetchone() == {"messages_share": 0.5}
    row = conn.execute("SELECT * FROM pgcast_messages_share_v2('global', 0.01)").fetchone()
    assert row == {"name": "global", "messages_share": 0.01}


def test_a_zero_share_stored_before_lets_messages_take_tokens_when_no_broadcast_waits(
        conn: Conn) -> None:
    # set by hand (or through v1): messages take tokens only when no broadcast is waiting
    # (test_messages_take_tokens_ahead_of_broadcasts_up_to_their_share: held back while one
    # waits)
    _bucket(conn, tokens=8, credit=0, share=0)
    assert _take_messages(conn, 8) == 8


def test_a_handoff_whose_answer_was_lost_is_put_back_uncalled(conn: Conn, db_url: str,
                                                              tmp_path: Path) -> None:
    from pgcast.sql.queries import QUERIES

    mid = send(conn, "ann@example.com")
    token = "44444444-4444-4444-4444-444444444444"
    conn.execute("SELECT * FROM pgcast_message_claim_v1(10, %s, 'w', interval '30 s')", (token,))
    conn.execute("SELECT * FROM pgcast_message_handoff_v2(%s, %s)", (token, [mid]))
    # another claim's token puts back nothing
    conn.execute(QUERIES["message_unhandoff"], {"token": "55555555-5555-5555-5555-555555555555",
                                                "ids": [mid]})
    assert status(conn, mid)["status"] == "sending"
    conn.execute(QUERIES["message_unhandoff"], {"token": token, "ids": [mid]})
    row = status(conn, mid)
    assert row["status"] == "queued" and not row["claimed"] and row["attempts"] == 0
    deliver(db_url, tmp_path)
    assert status(conn, mid)["status"] == "sent" and sent_files(tmp_path) == [str(mid)]


def test_transient_failures_are_retried_then_failed_and_a_bad_message_fails(
        conn: Conn, db_url: str, tmp_path: Path) -> None:
    mid = send(conn, "ann@example.com")
    bad = conn.execute("SELECT pgcast_send_message('default', 'bob@example.com', 'S', 'T', NULL, "
                       "'not an address', NULL) AS id").fetchone()["id"]  # type: ignore[index]
    # the file provider cannot write its outbox folder (a file is in the way): transient
    (tmp_path / "messages").write_text("in the way")
    deliver(db_url, tmp_path, max_retries=1)
    row = status(conn, mid)
    assert (row["status"], row["attempts"]) == ("queued", 1)
    assert "outbox write failed" in row["error"]
    assert not row["claimed"]  # queued again, claimable once its backoff is over
    bad_row = status(conn, bad)
    assert bad_row["status"] == "failed" and "cannot build the message" in bad_row["error"]
    conn.execute("UPDATE messages SET not_before = now() WHERE id = %s", (mid,))
    deliver(db_url, tmp_path, max_retries=1)
    row = status(conn, mid)
    assert (row["status"], row["attempts"]) == ("failed", 2) and "gave up after 2" in row["error"]
