"""Issue 23 items 1 and 2: one account's template never takes another account's time, in a
real worker and a real `pgcast api` (renders run in the render pool, under the budget)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests import support
from tests.integration import test_api_helpers as h
from tests.unit.test_render_budget import DOUBLING, MACRO, SQUARES

Conn = psycopg.Connection[dict[str, Any]]


def stored_broadcast(conn: Conn, account: str, text: str, n: int) -> uuid.UUID:
    """A sending broadcast of n contacts whose text was stored before any check saw it."""
    support.seed_contacts(conn, n, account=account, domain=f"{account}.example.com")
    bid = support.new_broadcast(conn, account=account, send=False)
    conn.execute("UPDATE broadcasts SET text_body = %s WHERE id = %s", (text, bid))
    from pgcast.sql import broadcasts

    assert broadcasts.send(conn, account, bid)["success"]
    return bid


def row(conn: Conn, bid: uuid.UUID) -> dict[str, Any]:
    found = conn.execute("SELECT * FROM broadcasts WHERE id = %s", (bid,)).fetchone()
    assert found is not None
    return dict(found)


def errors_of(conn: Conn, bid: uuid.UUID) -> list[str]:
    return [r["last_error"] or "" for r in conn.execute(
        "SELECT last_error FROM broadcast_recipients WHERE broadcast_id = %s AND "
        "status = 'failed'", (bid,))]


def test_a_bomb_template_fails_its_recipients_pauses_and_never_holds_the_worker(
        db_url: str, conn: Conn, procs: support.Processes) -> None:
    macro = stored_broadcast(conn, "bomber", MACRO, 40)
    squares = stored_broadcast(conn, "bomber2", SQUARES, 1)
    doubling = stored_broadcast(conn, "bomber3", DOUBLING, 1)
    calm = stored_broadcast(conn, "calm", "Hello {{ contact.name }}", 2)
    worker = procs.start(db_url, "worker", "--concurrency", "4", PGCAST_PROVIDER="null",
                         PGCAST_RENDER_TIMEOUT_MS="200")
    support.wait_for(lambda: row(conn, calm)["status"] == "sent", timeout=60,
                     what="the calm account's broadcast sent")
    assert row(conn, calm)["sent"] == 2
    support.wait_for(lambda: row(conn, macro)["status"] == "paused", timeout=60,
                     what="the bomb broadcast paused")
    support.wait_for(lambda: "sending" not in support.status_counts(conn, macro), timeout=60,
                     what="the bomb's groups in flight recorded")
    paused = row(conn, macro)
    assert paused["paused_reason"] == "render_budget"
    # a few renders (3 in a row per group in flight), not one per recipient: the rest wait
    # in pending for a fixed template
    counts = support.status_counts(conn, macro)
    assert 3 <= counts["failed"] <= 12 and counts["failed"] + counts["pending"] == 40, counts
    assert all("render budget exceeded (cpu_time)" in e for e in errors_of(conn, macro))
    for bid in (squares, doubling):
        support.wait_for(lambda b=bid: row(conn, b)["failed"] == 1, timeout=60,
                         what="the memory bomb's recipient failed")
        assert all("render budget exceeded (memory)" in e for e in errors_of(conn, bid))
    support.assert_counters_true(conn, macro)
    procs.stop(worker)
    assert "Traceback" not in procs.log(worker), procs.log(worker)


@contextlib.contextmanager
def running_api(db_url: str, procs: support.Processes, **env: str) -> Iterator[str]:
    port = support.free_port()
    base = f"http://127.0.0.1:{port}"
    proc = procs.start(db_url, "api", "--port", str(port), PGCAST_JWT_SECRET=h.SECRET, **env)
    support.wait_for(lambda: h.api_up(base) or proc.poll() is not None, timeout=60,
                     what="pgcast api")
    assert proc.poll() is None, procs.log(proc)
    yield base
    procs.stop(proc, timeout=60)
    assert "Traceback" not in procs.log(proc), procs.log(proc)


DRAFT = {"subject": "Hi", "from": "news@example.com"}


@pytest.mark.parametrize("bomb", [MACRO, SQUARES, DOUBLING])
def test_create_and_edit_refuse_a_template_over_the_budget(
        db_url: str, procs: support.Processes, bomb: str) -> None:
    with running_api(db_url, procs) as base, httpx.Client(base_url=base, timeout=60,
                                                            headers=h.auth("bomber")) as c:
        created = c.post("/broadcasts", json={**DRAFT, "text": bomb})
        assert created.status_code == 422, created.text
        assert "render budget exceeded" in created.json()["message"]
        ok = c.post("/broadcasts", json={**DRAFT, "text": "Hello {{ contact.name }}"})
        assert ok.status_code == 201, ok.text
        edited = c.patch(f"/broadcasts/{ok.json()['id']}", json={"html": bomb})
        assert edited.status_code == 422, edited.text
        assert "render budget exceeded" in edited.json()["message"]


def test_previews_of_one_account_never_hold_another_accounts_create(
        db_url: str, conn: Conn, procs: support.Processes) -> None:
    support.seed_contacts(conn, 1, account="bomber")
    bids = []
    for i in range(7):  # seven different bombs: none is answered from a known failure
        bid = support.new_broadcast(conn, account="bomber", send=False)
        conn.execute("UPDATE broadcasts SET text_body = %s WHERE id = %s",
                     (f"{{# {i} #}}{MACRO}", bid))
        bids.append(bid)
    # a generous budget: seven previews of the bombs take seconds on the account's share
    with running_api(db_url, procs, PGCAST_RENDER_TIMEOUT_MS="1000") as base, \
            concurrent.futures.ThreadPoolExecutor(8) as threads:
        def preview(bid: uuid.UUID) -> httpx.Response:
            with httpx.Client(base_url=base, timeout=120, headers=h.auth("bomber")) as c:
                return c.get(f"/broadcasts/{bid}/preview")

        previews = [threads.submit(preview, bid) for bid in bids]
        with httpx.Client(base_url=base, timeout=120, headers=h.auth("calm")) as c:
            created = c.post("/broadcasts", json={**DRAFT, "text": "Hi {{ contact.name }}"})
        assert created.status_code == 201, created.text
        # ordering, not timing: the calm account's create answered while the bomb
        # account's previews were still waiting for their share of the render pool
        assert not all(p.done() for p in previews)
        answers = [p.result() for p in previews]
    assert {a.status_code for a in answers} == {422}
    assert all("render budget exceeded" in a.json()["message"] for a in answers), \
        [a.json()["message"] for a in answers]


@pytest.mark.parametrize("bomb", [MACRO, SQUARES, DOUBLING])
def test_cli_create_refuses_a_template_over_the_budget(
        db_url: str, conn: Conn, tmp_path: Path, bomb: str) -> None:
    body = tmp_path / "body.txt"
    body.write_text(bomb)
    done = support.pgcast(db_url, "broadcast", "create", "--subject", "S", "--from",
                          "a@example.com", "--text", str(body), check=False)
    assert done.returncode == 2, done.stderr
    assert "render budget exceeded" in done.stderr
    assert conn.execute("SELECT count(*) AS n FROM broadcasts").fetchone() == {"n": 0}


def test_cli_edit_refuses_a_template_over_the_budget(
        db_url: str, conn: Conn, tmp_path: Path) -> None:
    body = tmp_path / "body.txt"
    body.write_text("Hello {{ unsubscribe_url }}")
    bid = support.pgcast(db_url, "broadcast", "create", "--subject", "S", "--from",
                         "a@example.com", "--text", str(body)).stdout.strip()
    body.write_text(MACRO)
    done = support.pgcast(db_url, "broadcast", "edit", bid, "--text", str(body), check=False)
    assert done.returncode == 2, done.stderr
    assert "render budget exceeded" in done.stderr
    assert conn.execute("SELECT text_body FROM broadcasts").fetchone() == {
        "text_body": "Hello {{ unsubscribe_url }}"}
