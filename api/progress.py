"""Progress (O(1) from the broadcast row), its Server-Sent Events stream, and recipient pages."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from pgcast.api import auth, context, cursors, db, errors, http, openapi, streams
from pgcast.sql import broadcasts

COUNTS = ("total", "pending", "sent", "failed", "skipped", "unknown", "cancelled")
FEEDBACK = ("delivered", "bounced", "complained")  # SES feedback (issue 14), also O(1)
RECONCILED = ("unknown_resolved", "unknown_requeued")  # unknown rows an SES event resolved,
# and those requeued once for want of one (PGCAST_RECONCILE_AFTER)
RECIPIENT_STATUSES = tuple(openapi.RECIPIENT_STATUSES)
PAGE_DEFAULT = 100
PAGE_MAX = 1000
HEARTBEAT = 15.0  # seconds without an event before a comment line keeps proxies from closing
RETRY_MS = 3000  # the EventSource reconnect delay we ask browsers for


def progress_json(row: dict[str, Any]) -> dict[str, Any]:
    """The progress shape; rate is the average of the current run, in emails per second.

    share_per_second is the broadcast's fair share of the global rate among the broadcasts
    taking tokens now (the rate_shares_active view); null when it takes none (no global
    limit, or nothing of it is being sent this second).

    rate counts every recipient a worker finished (sent, failed, skipped, unknown) in the
    current run over the time from its start to finished_at, or to the database's now while
    running (paused time included). The run starts at started_at, or at the last retry
    (rate_since, rate_base: the recipients already finished then are not counted).
    eta_seconds is pending / rate while sending, 0 once terminal, else null.
    """
    out: dict[str, Any] = {"status": row["status"],
                           **{k: int(row[k]) for k in (*COUNTS, *FEEDBACK)}}
    rate: float | None = None
    since = row.get("rate_since", row["started_at"])
    if since is not None:
        # this run's: from the first start, or from the last retry (what was finished before
        # it is not counted, nor the time between the runs)
        done = out["sent"] + out["failed"] + out["skipped"] + out["unknown"]
        done -= int(row.get("rate_base") or 0)
        end = row["finished_at"] or row["now"]
        elapsed = max((end - since).total_seconds(), 0.001)
        rate = round(max(done, 0) / elapsed, 2)
    eta: int | None = None
    if out["status"] in broadcasts.TERMINAL:
        eta = 0
    elif out["status"] == "sending" and rate:
        eta = math.ceil(out["pending"] / rate)
    share = row.get("share_per_second")
    return {**out, "rate": rate, "eta_seconds": eta, "scheduled_at": row["scheduled_at"],
            "filter_used": row.get("filter_used"),  # frozen at send (issue 27)
            "share_per_second": round(float(share), 2) if share is not None else None,
            # `unknown` is what is still open; these were unknown and are no longer (issue 25)
            **{k: int(row.get(k) or 0) for k in RECONCILED}}


async def _read(pool: db.Pool, account: str, bid: uuid.UUID) -> dict[str, Any] | None:
    row = await db.one(pool, "api_progress", {"account": account, "id": bid})
    return progress_json(row) if row is not None else None


async def progress(request: Request) -> Response:
    """GET /broadcasts/{id}/progress."""
    who = auth.principal(request)
    snap = await _read(context.pool(request), who.account, context.broadcast_id(request))
    if snap is None:
        raise errors.NotFound(context.NO_BROADCAST)
    return http.Json(snap)


def _event(name: str, seq: int, data: dict[str, Any]) -> str:
    return f"event: {name}\nid: {seq}\ndata: {http.dumps(data)}\n\n"


async def _stream(request: Request, who: auth.Principal, bid: uuid.UUID,
                  first: dict[str, Any]) -> AsyncIterator[str]:
    # One short pooled checkout per read, none while sleeping: an idle tab costs no connection.
    pool, interval = context.pool(request), context.settings(request).events_interval
    yield f"retry: {RETRY_MS}\n\n"
    snap: dict[str, Any] | None = first
    last_key: tuple[Any, ...] | None = None
    last_write, seq = time.monotonic(), 0
    while snap is not None:
        # rate/eta move with the clock only
        key = (snap["status"], *(snap[k] for k in (*COUNTS, *FEEDBACK)))
        if key != last_key:
            seq += 1
            yield _event("progress", seq, snap)
            last_key, last_write = key, time.monotonic()
        elif time.monotonic() - last_write > HEARTBEAT:
            yield ": keep-alive\n\n"
            last_write = time.monotonic()
        if snap["status"] in broadcasts.TERMINAL:
            yield _event("done", seq + 1, snap)
            return
        left = who.expires - time.time()
        if left <= 0:  # the token that opened the stream no longer holds: reconnect with a new one
            yield _event("expired", seq + 1, {"message": "the token has expired"})
            return
        await anyio.sleep(min(interval, left))
        if context.stopping(request) or await request.is_disconnected():
            return  # on shutdown the browser's EventSource reconnects (to another instance)
        if time.time() >= who.expires:
            continue  # say `expired` without reading on the dead token's behalf
        snap = await _read(pool, who.account, bid)
    yield _event("gone", seq + 1, {"message": context.NO_BROADCAST})  # a draft was deleted


async def events(request: Request) -> Response:
    """GET /broadcasts/{id}/events: progress on change, then `done`, `gone` or `expired`."""
    who = auth.principal(request)
    bid = context.broadcast_id(request)
    first = await _read(context.pool(request), who.account, bid)
    if first is None:
        raise errors.NotFound(context.NO_BROADCAST)
    slot = streams.take(request, who.account)  # 429 beyond the caps; released when it ends
    return streams.Stream(slot, _stream(request, who, bid, first),
                          media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def recipients(request: Request) -> Response:
    """GET /broadcasts/{id}/recipients: keyset-paged by contact id, optionally by status."""
    who = auth.principal(request)
    bid = context.broadcast_id(request)
    status = request.query_params.get("status") or None
    if status is not None and status not in RECIPIENT_STATUSES:
        raise errors.InvalidBody(f"status must be one of {', '.join(RECIPIENT_STATUSES)}")
    limit = http.query_int(request, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
    key, scope = context.settings(request).cursor_key, f"recipients\0{who.account}\0{bid}"
    raw = request.query_params.get("cursor")
    after = cursors.open_(key, scope, raw) if raw else 0
    pool = context.pool(request)
    rows = await db.all_rows(pool, "recipients_page", {  # one more: is there a next page?
        "account": who.account, "id": bid, "status": status, "after": after, "limit": limit + 1})
    if not rows and await db.one(pool, "api_broadcast_status",
                                 {"account": who.account, "id": bid}) is None:
        raise errors.NotFound(context.NO_BROADCAST)
    page = rows[:limit]
    items = [{"email": r["email"], "status": r["status"], "attempts": r["attempts"],
              "last_error": r["last_error"], "sent_at": r["sent_at"]} for r in page]
    next_cursor = cursors.seal(key, scope, page[-1]["contact_id"]) if len(rows) > limit else None
    return http.Json({"recipients": items, "next_cursor": next_cursor})
