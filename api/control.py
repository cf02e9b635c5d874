"""Send, cancel, pause, resume: one versioned SQL function each (CAS + audit + NOTIFY).

The response shapes and messages come from sql.broadcasts, shared with the CLI.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from pgcast.api import auth, context, db, errors, http, senders
from pgcast.sql import broadcasts, segments

PAUSE_REASON = "operator"
SEND_FIELDS = {"allow_empty": http.BOOLEAN}


def details(who: auth.Principal) -> str:
    """The audit details of an API action, as JSON: who did it."""
    return json.dumps(actor(who))


def actor(who: auth.Principal) -> dict[str, str]:
    """Who did an action, as the audit log records it."""
    return {"via": "api", "sub": who.sub}


async def _call(request: Request, who: auth.Principal, name: str,
                extra: dict[str, Any]) -> dict[str, Any]:
    row = await db.one(context.pool(request), name,
                       {"account": who.account, "id": context.broadcast_id(request), **extra})
    if row is None:
        raise errors.NotFound(context.NO_BROADCAST)
    return dict(row)


def _answer(result: dict[str, Any]) -> Response:
    # the CLI's shapes and messages (sql.broadcasts); a refused transition is a 409
    return http.Json(result, status_code=200 if result["success"] else 409)


async def send(request: Request) -> Response:
    """POST /broadcasts/{id}/send: snapshot the recipients and return at once."""
    who = auth.principal(request)
    # the body is optional: {"allow_empty": true}
    body = http.fields(await http.read_optional_json(request), "body", {}, SEND_FIELDS)
    await senders.check(request, who.account, context.broadcast_id(request))
    with segments.filter_errors():  # a saved segment deleted since the draft: 422
        row = await _call(request, who, "broadcast_send",
                          {"allow_empty": body.get("allow_empty", False),
                           "details": details(who)})
    segment = None
    if row["status"] == "empty":
        found = await db.one(context.pool(request), "broadcast_get",
                             {"account": who.account, "id": context.broadcast_id(request)})
        segment = broadcasts.audience_label(dict(found) if found else None)
    result = broadcasts.send_result(row, segment)
    response = _answer(result)
    if broadcasts.needs_analyze(result):
        # fresh planner statistics for the workers, after the answer has gone out
        response.background = BackgroundTask(db.rowcount, context.pool(request),
                                             "analyze_recipients",
                                             {"id": context.broadcast_id(request)})
    return response


async def cancel(request: Request) -> Response:
    """POST /broadcasts/{id}/cancel: stop a draft, scheduled, sending or paused broadcast."""
    who = auth.principal(request)
    row = await _call(request, who, "broadcast_cancel", {"details": details(who)})
    return _answer(broadcasts.cancel_result(row))


async def pause(request: Request) -> Response:
    """POST /broadcasts/{id}/pause: hold a sending broadcast."""
    who = auth.principal(request)
    row = await _call(request, who, "broadcast_pause",
                      {"reason": PAUSE_REASON, "details": details(who)})
    return _answer(broadcasts.pause_result(row, PAUSE_REASON))


async def resume(request: Request) -> Response:
    """POST /broadcasts/{id}/resume: continue a paused broadcast under a new epoch."""
    who = auth.principal(request)
    row = await _call(request, who, "broadcast_resume", {"details": details(who)})
    return _answer(broadcasts.resume_result(row))
