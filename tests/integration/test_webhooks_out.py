"""Outgoing webhooks (issue 30): events committed with their change, delivered signed, in
order, again after each failure, never to a refused address. Real Postgres, a real local
HTTP receiver, the worker's real delivery loop (in a thread of this process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgcast.sql import broadcasts, contacts, hooks
from pgcast.worker import hookhttp
from pgcast.worker import hooks as worker_hooks
from tests import hookreceiver, support

Conn = psycopg.Connection[dict[str, Any]]
DOC = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"
FAST = worker_hooks.Settings(poll=0.05, lease=5, timeout=2, retry_base=0.05)


@pytest.fixture
def local(monkeypatch: pytest.MonkeyPatch) -> None:
    """A local http receiver is allowed (as PGCAST_WEBHOOKS_ALLOW_* would allow it)."""
    monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_HTTP", "1")
    monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_PRIVATE", "1")


@contextlib.contextmanager
def delivering(db_url: str, settings: worker_hooks.Settings = FAST
               ) -> Iterator[worker_hooks.Deliverer]:
    """The worker's delivery loop, running in a thread until the block ends."""
    loop = asyncio.new_event_loop()
    stopping = asyncio.Event()
    holder: dict[str, Any] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)
        d = worker_hooks.Deliverer(db_url, settings, stopping, "test-worker")
        holder["d"] = d
        loop.run_until_complete(d.run())

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    support.wait_for(lambda: "d" in holder, timeout=10, what="the deliverer")
    try:
        yield holder["d"]
    finally:
        loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=30)
        assert not thread.is_alive()
        loop.close()


def add(conn: Conn, url: str, events: list[str], account: str = "default") -> dict[str, Any]:
    return hooks.add(conn, account, url, events, {"via": "test"})


def deliveries(conn: Conn) -> list[dict[str, Any]]:
    return conn.execute("SELECT d.*, e.type FROM webhook_deliveries d "
                        "JOIN webhook_events e ON e.id = d.event_id ORDER BY d.id").fetchall()


def doc_snippet() -> str:
    """The Python block under 'Verifying a delivery' in docs/webhooks.md, verbatim."""
    text = DOC.read_text()
    section = text.split("## Verifying a delivery", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python block under 'Verifying a delivery'"
    return match.group(1)


def verifier() -> Any:
    scope: dict[str, Any] = {}
    exec(compile(doc_snippet(), str(DOC), "exec"), scope)  # noqa: S102 - the doc's own code
    return scope["verify"]


def test_an_event_of_a_rolled_back_change_is_never_delivered(
        conn: Conn, db_url: str, local: None) -> None:
    support.seed_contacts(conn, 2)
    with hookreceiver.running() as rx:
        ep = add(conn, rx.url, ["contact.unsubscribed"])
        with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as tx:
            contacts.unsubscribe(tx, "default", "user0@example.com", source="api")
            assert tx.execute("SELECT count(*) AS n FROM webhook_events").fetchone() == {"n": 1}
            tx.rollback()
        contacts.unsubscribe(conn, "default", "user1@example.com", source="api")
        with delivering(db_url):
            support.wait_for(lambda: rx.ids(), timeout=30, what="a delivery")
            support.wait_for(lambda: deliveries(conn)[0]["status"] == "delivered", timeout=30)
        got = [json.loads(r.body) for r in rx.snapshot()]
    assert [g["data"]["email"] for g in got] == ["user1@example.com"]
    assert got[0]["type"] == "contact.unsubscribed" and got[0]["data"]["source"] == "api"
    assert [str(d["endpoint_id"]) for d in deliveries(conn)] == [ep["id"]]


def test_a_receiver_failing_three_times_gets_each_event_again_in_order_with_its_id(
        conn: Conn, db_url: str, local: None) -> None:
    support.seed_contacts(conn, 3)
    bid = support.new_broadcast(conn, send=False)
    with hookreceiver.running(fail_first=3) as rx:
        ep = add(conn, rx.url, ["*"])
        broadcasts.send(conn, "default", bid)
        broadcasts.pause(conn, "default", bid, reason="operator")
        broadcasts.cancel(conn, "default", bid)
        with delivering(db_url):
            support.wait_for(lambda: all(d["status"] == "delivered" for d in deliveries(conn)),
                             timeout=60, what="every delivery delivered")
        got = rx.snapshot()
    rows = deliveries(conn)
    assert [r["type"] for r in rows] == ["broadcast.sending", "broadcast.paused",
                                         "broadcast.cancelled"]
    ids = [str(r["event_id"]) for r in rows]
    # each event 4 times (3 failures + the success), always the same id, in commit order
    assert [r.event_id for r in got] == [i for i in ids for _ in range(4)]
    assert [r.status for r in got] == [500, 500, 500, 200] * 3
    assert all(r["attempts"] == 4 and r["last_status"] == 200 for r in rows)
    assert all(str(r["endpoint_id"]) == ep["id"] for r in rows)
    paused = json.loads(got[4].body)
    assert paused["data"]["reason"] == "operator"
    assert paused["data"]["previous_status"] == "sending"
    assert paused["account"] == "default" and paused["id"] == ids[1]


def test_signatures_verify_with_the_documented_snippet(
        conn: Conn, db_url: str, local: None) -> None:
    verify = verifier()
    support.seed_contacts(conn, 1)
    with hookreceiver.running() as rx:
        ep = add(conn, rx.url, ["contact.unsubscribed"])
        contacts.unsubscribe(conn, "default", "user0@example.com", source="cli")
        with delivering(db_url):
            support.wait_for(lambda: rx.ids(), timeout=30, what="a delivery")
        r = rx.snapshot()[0]
    assert verify(ep["secret"], r.signature, r.body)
    stamp = int(r.signature.split(",")[0].removeprefix("t="))
    assert not verify(ep["secret"], r.signature, r.body + b" ")  # a changed body
    assert not verify("whsec_other", r.signature, r.body)  # another secret
    assert not verify(ep["secret"], r.signature, r.body, now=stamp + 301)  # a replay
    assert verify(ep["secret"], r.signature, r.body, now=stamp + 299)
    assert not verify(ep["secret"], "garbage", r.body)
    # the body the signature covers is the documented envelope
    body = json.loads(r.body)
    assert set(body) == {"id", "type", "created_at", "account", "data"}
    assert r.event_id == body["id"]


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/hook", "https://10.1.2.3/hook", "https://169.254.169.254/latest",
    "https://[::1]/hook", "https://[fd00:ec2::254]/", "https://localhost/hook",
    "https://[::ffff:127.0.0.1]/", "https://0.0.0.0/", "https://192.168.1.1/",
])
def test_private_and_metadata_urls_are_refused_when_added(conn: Conn, url: str) -> None:
    with pytest.raises(hooks.errors.InvalidInput, match="refused"):
        add(conn, url, ["*"])


def test_plain_http_is_refused_unless_allowed(conn: Conn, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    with pytest.raises(hooks.errors.InvalidInput, match="must be https"):
        add(conn, "http://hooks.example.com/x", ["*"])
    monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_HTTP", "1")
    assert add(conn, "http://hooks.example.com/x", ["*"])["secret"].startswith("whsec_")


def test_metadata_is_refused_even_with_private_allowed(
        conn: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_PRIVATE", "1")
    add(conn, "https://10.1.2.3/hook", ["*"])
    with pytest.raises(hooks.errors.InvalidInput, match="metadata"):
        add(conn, "https://169.254.169.254/", ["*"])


def test_a_name_resolving_to_loopback_is_refused_at_delivery(
        conn: Conn, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint whose name resolves to 127.0.0.1 (added while private addresses were
    allowed, say): the worker resolves it, refuses, and the receiver gets nothing."""
    monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_HTTP", "1")
    support.seed_contacts(conn, 1)
    with hookreceiver.running() as rx:
        monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_PRIVATE", "1")
        add(conn, f"http://localhost:{rx.port}/hook", ["*"])
        monkeypatch.delenv("PGCAST_WEBHOOKS_ALLOW_PRIVATE")
        contacts.unsubscribe(conn, "default", "user0@example.com")
        with delivering(db_url):
            support.wait_for(lambda: deliveries(conn)[0]["attempts"] >= 2, timeout=30,
                             what="two refused attempts")
        assert rx.snapshot() == []
    d = deliveries(conn)[0]
    assert d["status"] == "pending" and d["last_status"] is None
    assert d["last_error"].startswith("refused: localhost resolves to a refused address")


def test_the_resolver_refuses_loopback_private_and_ipv6_literals(
        monkeypatch: pytest.MonkeyPatch) -> None:
    poster = hookhttp.Poster(2)

    async def check(host: str) -> str:
        try:
            return await poster.resolve(host, 443)
        except hookhttp.Refused as exc:
            return f"refused: {exc}"

    for host in ("localhost", "127.0.0.1", "10.0.0.7", "169.254.169.254", "::1", "fe80::1"):
        assert asyncio.run(check(host)).startswith("refused"), host
    assert asyncio.run(check("93.184.216.34")) == "93.184.216.34"
    monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_PRIVATE", "1")
    assert asyncio.run(check("10.0.0.7")) == "10.0.0.7"
    assert asyncio.run(check("169.254.169.254")).startswith("refused")


def test_a_failing_delivery_past_the_give_up_time_disables_the_endpoint_with_an_audit_entry(
        conn: Conn, db_url: str, local: None) -> None:
    support.seed_contacts(conn, 2)
    with hookreceiver.running(status=503) as rx:
        ep = add(conn, rx.url, ["*"])
        contacts.unsubscribe(conn, "default", "user0@example.com")
        contacts.unsubscribe(conn, "default", "user1@example.com")
        settings = worker_hooks.Settings(poll=0.05, lease=5, timeout=2, retry_base=0.05,
                                         give_up=0.3)
        with delivering(db_url, settings):
            support.wait_for(lambda: conn.execute(
                "SELECT NOT enabled AS off FROM webhook_endpoints").fetchone()["off"],
                timeout=30, what="the endpoint disabled")
        rows = deliveries(conn)
        assert [r["status"] for r in rows] == ["failed", "pending"]
        e = conn.execute("SELECT * FROM webhook_endpoints WHERE id = %s", (ep["id"],)).fetchone()
        assert e["disabled_reason"].startswith("failing since")
        assert e["audit_log"][-1]["action"] == "disable"
        # later events are not queued for a disabled endpoint; enable resumes the queue
        contacts.resubscribe(conn, "default", "user0@example.com", source="api",
                             actor={})
        contacts.unsubscribe(conn, "default", "user0@example.com")
        assert len(deliveries(conn)) == 2
        rx.status = 200
        conn.execute(hooks.QUERIES["hooks_enable"], {"account": "default", "id": ep["id"],
                                                      "actor": "{}"})
        with delivering(db_url, settings):
            support.wait_for(lambda: deliveries(conn)[1]["status"] == "delivered", timeout=30)


def test_events_of_every_path(conn: Conn, db_url: str) -> None:
    """Broadcast transitions (functions and a DBA's UPDATE), unsubscribes and suppressions
    each leave one event, in the change's transaction; an account without endpoints none."""
    support.seed_contacts(conn, 3)
    support.seed_contacts(conn, 1, account="other")
    add(conn, "https://hooks.example.com/a", ["*"])
    add(conn, "https://hooks.example.com/b", ["broadcast.sent", "contact.suppressed"])
    bid = support.new_broadcast(conn)
    conn.execute("UPDATE broadcasts SET status = 'sent', finished_at = now() WHERE id = %s",
                 (bid,))
    contacts.unsubscribe(conn, "default", "user0@example.com", source="cli")
    contacts.unsubscribe(conn, "other", "user0@example.com", source="cli")
    cid = conn.execute("SELECT id FROM contacts WHERE account = 'default' "
                       "AND email = 'user1@example.com'").fetchone()["id"]
    conn.execute("SELECT pgcast_contact_feedback_v1(%s, 'bounce', 'mailbox gone', "
                 "clock_timestamp(), 3, NULL, NULL)", (cid,))
    events = conn.execute("SELECT type, account, data FROM webhook_events ORDER BY created_at"
                          ).fetchall()
    assert [e["type"] for e in events] == ["broadcast.sending", "broadcast.sent",
                                           "contact.unsubscribed", "contact.suppressed"]
    assert all(e["account"] == "default" for e in events)
    assert events[3]["data"]["reason"] == "bounce" and events[3]["data"]["source"] == "ses"
    per = conn.execute("SELECT e.type, count(*) AS n FROM webhook_deliveries d JOIN "
                       "webhook_events e ON e.id = d.event_id GROUP BY 1 ORDER BY 1").fetchall()
    assert {p["type"]: p["n"] for p in per} == {"broadcast.sending": 1, "broadcast.sent": 2,
                                                "contact.unsubscribed": 1,
                                                "contact.suppressed": 2}


def test_erase_scrubs_the_address_from_stored_events(conn: Conn) -> None:
    support.seed_contacts(conn, 1)
    add(conn, "https://hooks.example.com/a", ["*"])
    contacts.unsubscribe(conn, "default", "user0@example.com")
    contacts.erase(conn, "default", "user0@example.com", source="api", actor={})
    text = json.dumps(conn.execute("SELECT data FROM webhook_events").fetchall())
    assert "user0@example.com" not in text and "@erased.invalid" in text


def test_contact_subscribed_is_emitted_by_its_function(conn: Conn) -> None:
    support.seed_contacts(conn, 1)
    add(conn, "https://hooks.example.com/a", ["contact.subscribed"])
    cid = conn.execute("SELECT id FROM contacts").fetchone()["id"]
    ev = conn.execute("SELECT pgcast_contact_subscribed_v1(%s, 'form') AS id", (cid,)
                      ).fetchone()["id"]
    row = conn.execute("SELECT type, data FROM webhook_events WHERE id = %s", (ev,)).fetchone()
    assert row["type"] == "contact.subscribed" and row["data"]["source"] == "form"
    assert uuid.UUID(str(ev))


def _form(conn: Conn, double_opt_in: bool) -> Any:
    return conn.execute("INSERT INTO forms (account, name, tags, from_address, double_opt_in) "
                        "VALUES ('default', %s, '{news}', 'news@example.com', %s) RETURNING id",
                        (f"f{double_opt_in}", double_opt_in)).fetchone()["id"]


def test_a_confirmed_sign_up_is_contact_subscribed_once(conn: Conn) -> None:
    """Double opt-in: the sign-up emits nothing, the confirmation contact.subscribed, a second
    click nothing. A form without opt-in: the sign-up itself, once."""
    add(conn, "https://hooks.example.com/a", ["*"])
    double, single = _form(conn, True), _form(conn, False)

    def subscribed() -> list[str]:
        return [r["data"]["email"] for r in conn.execute(
            "SELECT data FROM webhook_events WHERE type = 'contact.subscribed' "
            "ORDER BY created_at").fetchall()]

    conn.execute("SELECT * FROM pgcast_signup_v1(%s, 'ann@example.com', 'Ann', 3, '{}')",
                 (double,))
    assert subscribed() == []
    for _ in range(2):
        conn.execute("SELECT * FROM pgcast_confirm_v1('ann@example.com', %s, now(), '{}')",
                     (double,))
    assert subscribed() == ["ann@example.com"]
    for _ in range(2):
        conn.execute("SELECT * FROM pgcast_signup_v1(%s, 'bob@example.com', 'Bob', 3, '{}')",
                     (single,))
    assert subscribed() == ["ann@example.com", "bob@example.com"]


def test_message_events_follow_the_message_functions(conn: Conn) -> None:
    """message.sent, then delivered, bounced and complained from SES feedback; a failed
    record is message.failed. No address in any of them."""
    add(conn, "https://hooks.example.com/a", ["*"])
    ids = [conn.execute("SELECT pgcast_send_message('default', %s, 'Hi', 'text', NULL, "
                        "'app@example.com', %s) AS id", (f"m{i}@example.com", f"k{i}")
                        ).fetchone()["id"] for i in range(2)]
    assert conn.execute("SELECT count(*) AS n FROM webhook_events").fetchone()["n"] == 0
    token = uuid.uuid4()
    conn.execute("SELECT * FROM pgcast_message_claim_v1(10, %s, 'w', interval '30 s')",
                 (token,))
    conn.execute("SELECT * FROM pgcast_message_handoff_v2(%s, %s)", (token, ids))
    conn.execute("SELECT pgcast_message_record_v2(%s, %s, %s, %s, %s, %s)",
                 (token, ids, ["sent", "failed"], ["ses-1", None], [None, "rejected"],
                  [None, None]))
    for event in ("delivery", "bounce", "complaint"):
        conn.execute("SELECT pgcast_message_feedback_v1('ses-1', %s, now(), 'diag')", (event,))
    rows = conn.execute("SELECT type, data FROM webhook_events ORDER BY created_at").fetchall()
    assert sorted(r["type"] for r in rows) == sorted([
        "message.sent", "message.failed", "message.delivered", "message.bounced",
        "message.complained"])
    sent = next(r["data"] for r in rows if r["type"] == "message.sent")
    assert sent["message_id"] == str(ids[0]) and sent["idempotency_key"] == "k0"
    assert sent["provider_message_id"] == "ses-1" and sent["status"] == "sent"
    assert "@example.com" not in json.dumps([r["data"] for r in rows])


def test_prune_deletes_old_finished_deliveries_and_their_events_only(
        conn: Conn, db_url: str) -> None:
    support.seed_contacts(conn, 3)
    add(conn, "https://hooks.example.com/a", ["*"])
    for i in range(3):
        contacts.unsubscribe(conn, "default", f"user{i}@example.com")
    ids = [d["id"] for d in deliveries(conn)]
    # an old delivered one, an old failed one, an old pending one (never pruned)
    conn.execute("UPDATE webhook_deliveries SET status = 'delivered', "
                 "delivered_at = now() - interval '31 days' WHERE id = %s", (ids[0],))
    conn.execute("UPDATE webhook_deliveries SET status = 'failed', "
                 "last_attempt_at = now() - interval '31 days' WHERE id = %s", (ids[1],))
    conn.execute("UPDATE webhook_events SET created_at = now() - interval '31 days'")
    d = worker_hooks.Deliverer(db_url, worker_hooks.Settings(), asyncio.Event(), "t")

    async def prune() -> int:
        from psycopg_pool import AsyncConnectionPool

        async with AsyncConnectionPool(db_url, kwargs={"autocommit": True}) as pool:
            return await d.prune(pool)

    assert asyncio.run(prune()) == 4  # two deliveries, their two events
    assert [r["id"] for r in deliveries(conn)] == [ids[2]]
    assert conn.execute("SELECT count(*) AS n FROM webhook_events").fetchone()["n"] == 1


def _tls(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for `name` from a CA of our own, and a client
    context that trusts that CA only."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=1)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(pem))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cadata=ca.public_bytes(pem).decode())
    return server, client


def test_https_connects_to_the_checked_address_with_the_name_in_sni_and_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is resolved once; the connection goes to that address, TLS asks for the name
    (SNI) and verifies the certificate against it; a certificate for another name fails."""
    monkeypatch.setenv("PGCAST_WEBHOOKS_ALLOW_PRIVATE", "1")
    for cert_name, ok in (("localhost", True), ("other.example", False)):
        server, client = _tls(tmp_path, cert_name)
        with hookreceiver.running(tls=server) as rx:
            poster = hookhttp.Poster(5, verify=client)
            url = f"https://localhost:{rx.port}/hook"

            async def post(p: hookhttp.Poster = poster, u: str = url) -> hookhttp.Answer:
                try:
                    return await p.post(u, {"Pgcast-Event-Id": "e1"}, b"{}", "ep")
                finally:
                    await p.aclose()

            answer = asyncio.run(post())
            assert answer.ok is ok, answer
            assert rx.sni and set(rx.sni) == {"localhost"}
            if ok:
                assert [r.host for r in rx.snapshot()] == [f"localhost:{rx.port}"]
            else:
                assert "CERTIFICATE_VERIFY_FAILED" in (answer.error or "")
                assert rx.snapshot() == []


def test_a_redirect_is_a_failed_attempt_and_is_not_followed(
        conn: Conn, db_url: str, local: None) -> None:
    support.seed_contacts(conn, 1)
    with hookreceiver.running() as target, \
            hookreceiver.running(status=302) as rx:
        rx.location = target.url
        add(conn, rx.url, ["*"])
        contacts.unsubscribe(conn, "default", "user0@example.com")
        with delivering(db_url):
            support.wait_for(lambda: deliveries(conn)[0]["attempts"] >= 2, timeout=30)
        assert target.snapshot() == []
    d = deliveries(conn)[0]
    assert d["status"] == "pending" and d["last_status"] == 302
    assert d["last_error"] == "HTTP 302"


def test_a_dead_account_holds_at_most_its_share_of_slots(
        conn: Conn, db_url: str, local: None) -> None:
    """Account a's three endpoints never answer (each attempt waits out the timeout); with
    three slots, one per account, account b's events are delivered meanwhile."""
    support.seed_contacts(conn, 1, account="a")
    support.seed_contacts(conn, 3, account="b")
    settings = worker_hooks.Settings(concurrency=3, per_account=1, poll=0.05, lease=10,
                                     timeout=4, retry_base=60)
    with hookreceiver.running(delay=6) as dead, hookreceiver.running() as live:
        for _ in range(3):
            add(conn, dead.url, ["*"], account="a")
        add(conn, live.url, ["*"], account="b")
        contacts.unsubscribe(conn, "a", "user0@example.com")
        with delivering(db_url, settings):
            support.wait_for(dead.started.is_set, timeout=10, what="a's first attempt")
            for i in range(3):
                contacts.unsubscribe(conn, "b", f"user{i}@example.com")
            support.wait_for(lambda: len(live.ids()) == 3, timeout=3,
                             what="b's events while a's endpoint hangs")
            # a's attempts are still waiting: one endpoint of a at a time
            assert len(dead.snapshot()) == 0
            held = conn.execute("SELECT count(*) AS n FROM webhook_endpoints "
                                "WHERE account = 'a' AND lease_expires_at > now()").fetchone()
            assert held["n"] == 1


def test_one_record_statement_writes_a_batch_under_each_endpoints_lease(conn: Conn) -> None:
    """pgcast_webhook_record_v2 (the worker's group commit): a success is delivered and its
    lease extended, a failure is scheduled again and its endpoint given back, and an attempt
    whose lease was lost (another token) records nothing."""
    eps = [conn.execute("INSERT INTO webhook_endpoints (account, url, events, secret) VALUES "
                        "('default', %s, '{*}', 's') RETURNING id", (f"https://h{i}.example/",)
                        ).fetchone()["id"] for i in range(3)]
    conn.execute("SELECT pgcast_emit_event_v1('default', 'broadcast.sent', '{}')")
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    for ep, token in zip(eps, (mine, mine, theirs), strict=True):
        conn.execute("UPDATE webhook_endpoints SET lease_token = %s, worker = 'w', "
                     "lease_expires_at = now() + interval '20 seconds' WHERE id = %s",
                     (token, ep))
    ids = [conn.execute("SELECT id FROM webhook_deliveries WHERE endpoint_id = %s", (ep,)
                        ).fetchone()["id"] for ep in eps]
    rows = conn.execute(hooks.QUERIES["hooks_record"], {
        "endpoints": eps, "tokens": [mine, mine, mine], "deliveries": ids,
        "ok": [True, False, True], "status": [200, 503, 200],
        "error": [None, "HTTP 503", None], "latency_ms": [21.5, 22.5, 23.5],
        "response": ["{}", "x" * 2000, "{}"], "lease": 60, "base": 10, "give_up": 3600,
    }).fetchall()
    assert {r["delivery_id"]: r["outcome"] for r in rows} == {
        ids[0]: "delivered", ids[1]: "retry"}
    assert len(rows) == 2
    d = {r["id"]: r for r in deliveries(conn)}
    assert d[ids[0]]["status"] == "delivered" and d[ids[0]]["attempts"] == 1
    assert d[ids[0]]["latency_ms"] == 21.5 and d[ids[0]]["response"] == "{}"
    assert d[ids[1]]["status"] == "pending" and d[ids[1]]["attempts"] == 1
    assert d[ids[1]]["last_status"] == 503 and len(d[ids[1]]["response"]) == 1024
    assert d[ids[2]]["status"] == "pending" and d[ids[2]]["attempts"] == 0
    e = {r["id"]: r for r in conn.execute(
        "SELECT id, lease_token, lease_expires_at - now() > interval '30 seconds' AS extended, "
        "(SELECT next_attempt_at - now() > interval '5 seconds' FROM webhook_deliveries "
        " WHERE endpoint_id = e.id) AS later FROM webhook_endpoints e").fetchall()}
    assert e[eps[0]]["lease_token"] == mine and e[eps[0]]["extended"]
    assert e[eps[1]]["lease_token"] is None and e[eps[1]]["later"]
    assert e[eps[2]]["lease_token"] == theirs and not e[eps[2]]["extended"]


def test_attempts_ending_together_are_recorded_by_one_statement(conn: Conn, db_url: str) -> None:
    """The Recorder's group commit: outcomes handed over while no record is being written go
    out together, one statement for the batch, each delivery told its own outcome."""
    token = uuid.uuid4()
    eps = [conn.execute("INSERT INTO webhook_endpoints (account, url, events, secret, "
                        "lease_token, lease_expires_at, worker) VALUES ('default', %s, '{*}', "
                        "'s', %s, now() + interval '1 minute', 'w') RETURNING id",
                        (f"https://h{i}.example/", token)).fetchone()["id"] for i in range(8)]
    conn.execute("SELECT pgcast_emit_event_v1('default', 'broadcast.sent', '{}')")
    rows = deliveries(conn)

    async def run() -> tuple[list[str | None], int]:
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool
        async with AsyncConnectionPool(db_url, min_size=1, max_size=2, kwargs={
                "autocommit": True, "row_factory": dict_row}) as pool:
            rec = worker_hooks.Recorder(pool, FAST)
            ok = hookhttp.Answer(True, 200, None, "{}", 20.0)
            outcomes = await asyncio.gather(*(
                rec.record(worker_hooks.Outcome(r["endpoint_id"], token, r["id"], ok))
                for r in rows))
            return list(outcomes), rec.statements

    outcomes, statements = asyncio.run(run())
    assert len(rows) == len(eps) == 8
    assert outcomes == ["delivered"] * 8
    assert statements == 1
    assert {r["status"] for r in deliveries(conn)} == {"delivered"}
