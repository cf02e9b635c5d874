"""Schedule, unschedule, retry and copy: POST /broadcasts/{id}/schedule|unschedule|retry|copy.

The checks, response shapes and messages come from sql.schedule, shared with the CLI.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from pgcast.api import auth, broadcasts, context, db, errors, http, senders
from pgcast.sql import errors as sql_errors
from pgcast.sql import schedule

TIME_FIELDS = {"at": http.STRING}
WINDOW_FIELDS = {"not_after": http.STRING_OR_NULL}


def _details(who: auth.Principal) -> str:
    # who did it goes into the broadcast's audit log
    return json.dumps({"via": "api", "sub": who.sub})


def _answer(result: dict[str, Any]) -> Response:
    # a refused transition is a 409, with the shapes the CLI prints
    return http.Json(result, status_code=200 if result["success"] else 409)


async def _call(request: Request, who: auth.Principal, name: str,
                extra: dict[str, Any]) -> dict[str, Any]:
    row = await db.one(context.pool(request), name, {
        "account": who.account, "id": context.broadcast_id(request),
        "details": _details(who), **extra})
    if row is None:
        raise errors.NotFound(context.NO_BROADCAST)
    return dict(row)




async def schedule_route(request: Request) -> Response:
    """POST /broadcasts/{id}/schedule: draft -> scheduled at `at` (optional `not_after`)."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body", TIME_FIELDS, WINDOW_FIELDS)
    context.broadcast_id(request)  # a malformed id is a 404 before the body's checks
    try:
        at, not_after = schedule.parse_window(body["at"], body.get("not_after"))
    except sql_errors.InvalidInput as exc:
        raise errors.InvalidBody(str(exc)) from None
    await senders.check(request, who.account, context.broadcast_id(request))
    row = await _call(request, who, "broadcast_schedule", {"at": at, "not_after": not_after})
    return _answer(schedule.schedule_result(row))


async def unschedule_route(request: Request) -> Response:
    """POST /broadcasts/{id}/unschedule: scheduled -> draft."""
    who = auth.principal(request)
    row = await _call(request, who, "broadcast_unschedule", {})
    return _answer(schedule.unschedule_result(row))


def _include_unknown(body: Any) -> bool:
    """The retry body's one optional field (http.fields refuses booleans everywhere)."""
    if not isinstance(body, dict):
        raise errors.InvalidBody("body must be a JSON object")
    for name in body:
        if name != "include_unknown":
            raise errors.InvalidBody(f"body.{name}: unknown field",
                                     [{"field": f"body.{name}", "problem": "unknown field"}])
    value = body.get("include_unknown", False)
    if not isinstance(value, bool):
        problem = {"field": "body.include_unknown", "problem": "must be a boolean"}
        raise errors.InvalidBody("body.include_unknown: must be a boolean", [problem])
    return value


async def retry_route(request: Request) -> Response:
    """POST /broadcasts/{id}/retry: failed (and, when asked, unknown) recipients again."""
    who = auth.principal(request)
    include_unknown = _include_unknown(await http.read_optional_json(request))
    row = await _call(request, who, "broadcast_retry", {
        "include_unknown": include_unknown, "in_doubt": schedule.in_doubt_seconds()})
    return _answer(schedule.retry_result(row, include_unknown))


async def copy_route(request: Request) -> Response:
    """POST /broadcasts/{id}/copy: a new draft with the same content and segment."""
    who = auth.principal(request)
    row = await _call(request, who, "broadcast_copy", {})
    return http.Json(broadcasts.broadcast_json(row), status_code=201,
                     headers={"Location": f"/broadcasts/{row['id']}"})
