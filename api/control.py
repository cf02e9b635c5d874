"""Send, cancel, pause, resume: one versioned SQL function each (CAS + audit + NOTIFY).

The response shapes and messages come from sql.broadcasts, shared with the CLI.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from api import auth, context, db, errors, http
from sql import broadcasts

PAUSE_REASON = "operator"


def _details(who: auth.Principal) -> str:
    # who did it goes into the broadcast's audit log
    return json.dumps({"via": "api", "sub": who.sub})


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


async def _allow_empty(request: Request) -> bool:
    # the body is optional: none, or {"allow_empty": true|false}
    headers = request.headers
    if headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers:
        return False
    body = await http.read_json(request)
    if not isinstance(body, dict) or set(body) - {"allow_empty"}:
        raise errors.InvalidBody('body: the only field is "allow_empty"')
    value = body.get("allow_empty", False)
    if not isinstance(value, bool):
        raise errors.InvalidBody("body.allow_empty: must be true or false")
    return value


async def send(request: Request) -> Response:
    """POST /broadcasts/{id}/send: snapshot the recipients and return at once (409 when
    nobody matches, unless {"allow_empty": true})."""
    who = auth.principal(request)
    row = await _call(request, who, "broadcast_send",
                      {"allow_empty": await _allow_empty(request), "details": _details(who)})
    segment = None
    if row["status"] == "empty":
        found = await db.one(context.pool(request), "broadcast_get",
                             {"account": who.account, "id": context.broadcast_id(request)})
        segment = found["segment_tag"] if found else None
    result = broadcasts.send_result(row, segment)
    response = _answer(result)
    if broadcasts.needs_analyze(result):
        # fresh planner statistics for the workers, after the answer has gone out
        response.background = BackgroundTask(db.rowcount, context.pool(request),
                                             "analyze_recipients",
                                             {"id": context.broadcast_id(request)})
    return response


async def cancel(request: Request) -> Response:
    """POST /broadcasts/{id}/cancel: stop a draft, sending or paused broadcast."""
    who = auth.principal(request)
    row = await _call(request, who, "broadcast_cancel", {"details": _details(who)})
    return _answer(broadcasts.cancel_result(row))


async def pause(request: Request) -> Response:
    """POST /broadcasts/{id}/pause: hold a sending broadcast."""
    who = auth.principal(request)
    row = await _call(request, who, "broadcast_pause",
                      {"reason": PAUSE_REASON, "details": _details(who)})
    return _answer(broadcasts.pause_result(row, PAUSE_REASON))


async def resume(request: Request) -> Response:
    """POST /broadcasts/{id}/resume: continue a paused broadcast under a new epoch."""
    who = auth.principal(request)
    row = await _call(request, who, "broadcast_resume", {"details": _details(who)})
    return _answer(broadcasts.resume_result(row))
