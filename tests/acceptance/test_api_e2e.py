"""A whole broadcast over real HTTP: `pgcast api` (uvicorn) and real workers, one Postgres."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests import support
from tests.integration import test_api_helpers as h

pytestmark = pytest.mark.acceptance
Conn = psycopg.Connection[dict[str, Any]]
N = 300  # contacts


def _read_events(url: str, headers: dict[str, str], out: list[tuple[str, Any]],
                 opened: threading.Event) -> None:
    with contextlib.suppress(httpx.HTTPError), \
            httpx.stream("GET", url, headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        opened.set()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: ") and name:
                out.append((name, json.loads(line[len("data: "):])))
                if name == "done":
                    return


def test_a_broadcast_driven_over_http(db_url: str, conn: Conn, procs: support.Processes) -> None:
    port = support.free_port()
    base = f"http://127.0.0.1:{port}"
    api = procs.start(db_url, "api", "--port", str(port), PGCAST_JWT_SECRET=h.SECRET,
                      PGCAST_API_EVENTS_INTERVAL="0.1")
    support.wait_for(lambda: h.api_up(base) or api.poll() is not None, timeout=30,
                     what="pgcast api")
    assert api.poll() is None, procs.log(api)
    token = support.pgcast(db_url, "token", "--account", h.ACCOUNT, env=support.pgcast_env(
        db_url, PGCAST_JWT_SECRET=h.SECRET)).stdout.strip()
    auth = {"Authorization": f"Bearer {token}"}

    with httpx.Client(base_url=base, headers=auth, timeout=30) as http:
        people = [{"email": f"p{i}@example.com", "name": f"P {i}", "tags": ["all"]}
                  for i in range(N)]
        r = http.post("/contacts", json={"contacts": [*people, {"email": "broken"}]})
        assert r.status_code == 200 and r.json()["upserted"] == N
        assert [x["index"] for x in r.json()["rejected"]] == [N]
        r = http.post("/contacts/unsubscribe", json={"email": "p7@example.com"})
        assert r.status_code == 200

        r = http.post("/broadcasts", json={"subject": "Launch", "from": "news@example.com",
                                           "text": "We launched.", "tag": "all"})
        assert r.status_code == 201
        bid = r.json()["id"]

        events: list[tuple[str, Any]] = []
        opened = threading.Event()
        reader = threading.Thread(target=_read_events, daemon=True, args=(
            f"{base}/broadcasts/{bid}/events", auth, events, opened))
        reader.start()
        assert opened.wait(30)

        for _ in range(2):
            procs.start(db_url, "worker", "--concurrency", "2", PGCAST_PROVIDER="null")
        r = http.post(f"/broadcasts/{bid}/send")
        assert r.json() == {"success": True, "status": "sending", "queued": N - 1,
                            "message": f"Broadcast queued for {N - 1} recipients"}

        def finished() -> dict[str, Any] | None:
            p = http.get(f"/broadcasts/{bid}/progress").json()
            return p if p["status"] == "sent" else None

        final = support.wait_for(finished, timeout=120, every=0.2, what="broadcast sent")
        assert (final["total"], final["sent"], final["pending"], final["eta_seconds"]) == (
            N - 1, N - 1, 0, 0)
        assert final["rate"] > 0
        reader.join(30)
        assert not reader.is_alive()

        page = http.get(f"/broadcasts/{bid}/recipients", params={"status": "sent",
                                                                 "limit": 1000}).json()
        assert len(page["recipients"]) == N - 1 and page["next_cursor"] is None
        listed = http.get("/broadcasts").json()["broadcasts"]
        assert [(b["id"], b["status"]) for b in listed] == [(bid, "sent")]
        assert http.post(f"/broadcasts/{bid}/send").status_code == 409

    names = [name for name, _ in events]
    assert names[0] == "progress" and events[0][1]["status"] == "draft"
    assert names[-2:] == ["progress", "done"] and names.count("done") == 1
    sent = [d["sent"] for _, d in events]
    assert sent == sorted(sent)  # counters never go backwards
    assert events[-1][1] == final  # finished_at fixes the rate

    # SIGTERM stops the server even while a dashboard watches a draft that never ends
    with httpx.Client(base_url=base, headers=auth, timeout=30) as http:
        draft = http.post("/broadcasts", json={"subject": "Later", "from": "news@example.com",
                                               "text": "Soon."}).json()["id"]
    watching: list[tuple[str, Any]] = []
    opened = threading.Event()
    watcher = threading.Thread(target=_read_events, daemon=True, args=(
        f"{base}/broadcasts/{draft}/events", auth, watching, opened))
    watcher.start()
    assert opened.wait(30)
    support.wait_for(lambda: watching, timeout=30, what="the draft's first event")
    # uvicorn re-raises the signal once it has shut down
    assert procs.stop(api, timeout=60) in (0, -signal.SIGTERM)
    assert "Traceback" not in procs.log(api), procs.log(api)
    support.assert_counters_true(conn, uuid.UUID(bid))
    assert "Traceback" not in procs.log(api), procs.log(api)
