"""Outgoing webhooks (issue 30): an account's endpoints and their delivery log.

Not api/webhooks.py, which receives SES feedback from SNS.
"""

from __future__ import annotations

import re
import uuid

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pgcast.api import auth, context, db, errors, http
from pgcast.sql import errors as sql_errors
from pgcast.sql import hooks

NO_ENDPOINT = "no such webhook endpoint in this account"
PAGE_DEFAULT = 100
PAGE_MAX = 1000


def uuid_ids(route: Route) -> Route:
    """The route's {id} matches a UUID only: /webhooks/ses (the SNS route) stays its own path
    for every method (DELETE /webhooks/ses is a 405 there, as the document says)."""
    pattern = route.path_regex.pattern.replace("(?P<id>[^/]+)", "(?P<id>[0-9A-Fa-f-]{32,36})")
    route.path_regex = re.compile(pattern)
    return route


def _endpoint_id(request: Request) -> uuid.UUID:
    """The {id} path parameter; a malformed id is an unknown one (404)."""
    try:
        return uuid.UUID(str(request.path_params["id"]))
    except ValueError:
        raise errors.NotFound(NO_ENDPOINT) from None


def _actor(request: Request) -> dict[str, str]:
    return {"via": "api", "sub": auth.principal(request).sub}


async def create(request: Request) -> Response:
    """POST /webhooks: a new endpoint; its secret is in this answer only."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body",
                       {"url": http.STRING, "events": http.ARRAY})
    try:
        params = hooks.add_params(who.account, body["url"], body["events"], _actor(request))
        row = await db.one(context.pool(request), "hooks_add", params)
        result = hooks.added(dict(row) if row is not None else None, params)
    except sql_errors.InvalidInput as exc:
        raise errors.InvalidBody(str(exc)) from None
    return http.Json(result, status_code=201, headers={"Location": f"/webhooks/{result['id']}"})


async def list_all(request: Request) -> Response:
    """GET /webhooks: the account's endpoints (never their secrets)."""
    who = auth.principal(request)
    rows = await db.all_rows(context.pool(request), "hooks_list", {"account": who.account})
    return http.Json({"webhooks": [hooks.item(dict(r)) for r in rows]})


async def remove(request: Request) -> Response:
    """DELETE /webhooks/{id}: the endpoint and its deliveries."""
    who = auth.principal(request)
    row = await db.one(context.pool(request), "hooks_remove",
                       {"account": who.account, "id": _endpoint_id(request)})
    if row is None:
        raise errors.NotFound(NO_ENDPOINT)
    return Response(status_code=204)


async def rotate(request: Request) -> Response:
    """POST /webhooks/{id}/rotate-secret: a new secret, in this answer only."""
    who = auth.principal(request)
    secret = hooks.new_secret()
    row = await db.one(context.pool(request), "hooks_rotate", {
        "account": who.account, "id": _endpoint_id(request), "secret": secret,
        "actor": http.dumps(_actor(request))})
    if row is None:
        raise errors.NotFound(NO_ENDPOINT)
    return http.Json({**hooks.item(dict(row)), "secret": secret})


async def enable(request: Request) -> Response:
    """POST /webhooks/{id}/enable: deliver to a disabled endpoint again."""
    who = auth.principal(request)
    row = await db.one(context.pool(request), "hooks_enable", {
        "account": who.account, "id": _endpoint_id(request),
        "actor": http.dumps(_actor(request))})
    if row is None:
        raise errors.NotFound(NO_ENDPOINT)
    return http.Json(hooks.item(dict(row)))


async def deliveries(request: Request) -> Response:
    """GET /webhooks/{id}/deliveries: the delivery log, newest first."""
    who = auth.principal(request)
    eid = _endpoint_id(request)
    limit = http.query_int(request, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
    before = http.query_int(request, "before", 0, 0, 2**62)
    pool = context.pool(request)
    if not await db.all_rows(pool, "hooks_one", {"account": who.account, "id": eid}):
        raise errors.NotFound(NO_ENDPOINT)
    rows = await db.all_rows(pool, "hooks_deliveries", {
        "account": who.account, "id": eid, "before": before, "limit": limit})
    return http.Json({"deliveries": [hooks.item(dict(r)) for r in rows],
                      "next_before": rows[-1]["id"] if len(rows) == limit else None})


async def redeliver(request: Request) -> Response:
    """POST /webhooks/{id}/deliveries/{delivery_id}/redeliver: queue that event again."""
    who = auth.principal(request)
    try:
        delivery = int(str(request.path_params["delivery_id"]))
    except ValueError:
        raise errors.NotFound("no such delivery") from None
    if not 0 < delivery < 2**63:
        raise errors.NotFound("no such delivery")
    row = await db.one(context.pool(request), "hooks_redeliver", {
        "account": who.account, "id": _endpoint_id(request), "delivery": delivery})
    if row is None:
        raise errors.NotFound("no such delivery")
    return http.Json(hooks.item(dict(row)), status_code=202)
