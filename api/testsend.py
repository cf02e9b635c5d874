"""POST /broadcasts/{id}/test: send the rendered message to a few addresses, for real."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from pgcast.api import auth, context, db, errors, http, senders
from pgcast.mail import errors as mail_errors
from pgcast.mail import validate
from pgcast.sql import jobs
from pgcast.sql import senders as sql_senders

MAX_TO = 5  # addresses in one test send
HOURLY_CAP = 50  # test messages per account per hour: the route is not a relay


def addresses(raw: Any) -> list[str]:
    """1 to MAX_TO valid addresses, normalized and deduplicated; raises InvalidValue."""
    if not isinstance(raw, list) or not raw:
        raise mail_errors.InvalidValue("to", "must be a non-empty array of addresses")
    if len(raw) > MAX_TO:
        raise mail_errors.InvalidValue("to", f"at most {MAX_TO} addresses")
    out: list[str] = []
    for item in raw:
        clean = validate.address(item, "to")
        if clean not in out:
            out.append(clean)
    return out


async def create(request: Request) -> Response:
    """Queue test sends for a running worker; 202 with their ids, 429 past the hourly cap."""
    who = auth.principal(request)
    bid = context.broadcast_id(request)
    body = http.fields(await http.read_json(request), "body", {"to": http.ARRAY},
                       {"contact": http.STRING_OR_NULL})
    try:
        to = addresses(body["to"])
        contact = validate.address(body["contact"], "contact") if body.get("contact") else None
    except mail_errors.InvalidValue as exc:
        raise errors.InvalidBody(str(exc)) from None
    await senders.check(request, who.account, bid)
    row = await db.one(context.pool(request), "test_send_queue", {
        "account": who.account, "id": bid, "to": to, "contact": contact, "cap": HOURLY_CAP})
    assert row is not None
    if not row["found"]:
        raise errors.NotFound(context.NO_BROADCAST)
    # decided under the erasure lock, with the queue: an erase cannot come between
    refused = sql_senders.refused_recipients(row["refused"])
    if refused:
        raise errors.InvalidBody(refused)
    if not row["ok"]:
        return http.Json({"error": "too_many_test_sends",
                          "message": f"at most {HOURLY_CAP} test messages per account per hour "
                                     f"({row['recent']} in the last hour)"},
                         status_code=429, headers={"Retry-After": "3600"})
    ids = list(row["ids"])
    await jobs.defer_test_send(request.app.state.database_url, ids)
    return http.Json({"test_sends": [{"id": i, "to": a, "status": "queued"}
                                     for i, a in zip(ids, to, strict=True)]}, status_code=202)


async def status(request: Request) -> Response:
    """GET /broadcasts/{id}/test?ids=1,2: the outcome of test sends."""
    who = auth.principal(request)
    bid = context.broadcast_id(request)
    raw = request.query_params.get("ids", "")
    try:
        ids = [int(x) for x in raw.split(",") if x.strip()][:MAX_TO]
    except ValueError:
        raise errors.InvalidBody("ids must be test send ids separated by commas") from None
    rows = await db.all_rows(context.pool(request), "test_send_status",
                             {"ids": ids, "account": who.account, "id": bid})
    return http.Json({"test_sends": [
        {"id": r["id"], "to": r["to_address"], "status": r["status"],
         "message_id": r["message_id"], "error": r["error"]} for r in rows]})
