"""Saved segments and filter counts: /segments routes (sql.segments holds the rules)."""

from __future__ import annotations

from typing import Any

import psycopg
from starlette.requests import Request
from starlette.responses import Response

from pgcast.api import auth, context, db, errors, http
from pgcast.sql import errors as sql_errors
from pgcast.sql import segments

SAVE_FIELDS = {"name": http.STRING, "filter": ("an object", (dict,))}
COUNT_FIELDS = {"filter": ("an object", (dict,))}


def segment_json(row: dict[str, Any]) -> dict[str, Any]:
    """A saved segment as the API shows it."""
    return {"name": row["name"], "filter": row["filter"], "created_at": row["created_at"],
            "updated_at": row["updated_at"]}


def _name(request: Request) -> str:
    raw = request.path_params["name"]
    try:
        return segments.check_name(raw)
    except sql_errors.InvalidInput:
        raise errors.NotFound(f"no saved segment {raw}") from None


async def _one(request: Request, name: str, params: dict[str, Any]) -> dict[str, Any] | None:
    with segments.filter_errors():  # the compiler's refusal: 422 naming the JSON path
        row = await db.one(context.pool(request), name, params)
    return dict(row) if row is not None else None


async def checked(request: Request, account: str, value: Any) -> str | None:
    """A broadcast's segment_filter checked against the account's saved segments, as JSON
    text (None stays None); raises InvalidInput (422) naming the JSON path."""
    if value is None:
        return None
    text = segments.bounded(value)
    await _one(request, "segment_check", {"account": account, "filter": text})
    return text


async def save(request: Request) -> Response:
    """POST /segments: create or replace a saved segment (201 when new)."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body", SAVE_FIELDS)
    params = {"account": who.account, "name": segments.check_name(body["name"]),
              "filter": segments.bounded(body["filter"])}
    row = await _one(request, "segment_save", params)
    assert row is not None
    return http.Json(segment_json(row), status_code=201 if row["inserted"] else 200)


async def list_all(request: Request) -> Response:
    """GET /segments: the account's saved segments by name."""
    who = auth.principal(request)
    rows = await db.all_rows(context.pool(request), "segment_list", {"account": who.account})
    return http.Json({"segments": [segment_json(dict(r)) for r in rows]})


async def get(request: Request) -> Response:
    """GET /segments/{name}."""
    who = auth.principal(request)
    name = _name(request)
    row = await db.one(context.pool(request), "segment_get",
                       {"account": who.account, "name": name})
    if row is None:
        raise errors.NotFound(f"no saved segment {name}")
    return http.Json(segment_json(dict(row)))


async def delete(request: Request) -> Response:
    """DELETE /segments/{name}: 204; 409 while a saved segment, a draft or a scheduled
    broadcast refers to it."""
    who = auth.principal(request)
    name = _name(request)
    params = {"account": who.account, "name": name}
    used = await db.all_rows(context.pool(request), "segment_users", params)
    if used:
        used_by = [f"{r['kind']} {r['what']}" for r in used]
        return http.Json({"success": False, "name": name, "used_by": used_by,
                          "message": segments.refused_delete(name, used_by)}, status_code=409)
    if await db.one(context.pool(request), "segment_delete", params) is None:
        raise errors.NotFound(f"no saved segment {name}")
    return Response(status_code=204)


async def count(request: Request) -> Response:
    """POST /segments/count: {"filter": ...} -> {"count": N} mailable contacts; a count longer
    than sql.segments.COUNT_TIMEOUT_MS is cancelled (422)."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body", COUNT_FIELDS)
    params = {"account": who.account, "filter": segments.bounded(body["filter"])}
    try:
        async with context.pool(request).connection() as conn, conn.transaction():
            await conn.execute(db.query("segment_count_limit"),
                               {"ms": segments.COUNT_TIMEOUT_MS})
            with segments.filter_errors(), db.bad_text_is_bad_input():
                cur = await conn.execute(db.query("segment_count"), params)
            row = await cur.fetchone()
    except psycopg.errors.QueryCanceled:
        raise segments.too_slow() from None
    assert row is not None
    return http.Json({"count": int(row["count"])})
