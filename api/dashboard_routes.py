"""The dashboard: its static page (/, /static/...) and the routes it needs beyond the core API.

The page is plain files in api/static/ (no build step, no outside request) and talks only to
the public HTTP API, with the token in the Authorization header.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from pgcast.api import auth, context, db, errors, http
from pgcast.sql import contacts, segments
from pgcast.sql import errors as sql_errors

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_IMPORT_BYTES = 64 * 1024 * 1024  # a CSV upload; about 1,000,000 contacts with names
UPSERT_CHUNK = 10_000  # rows per statement, as the CLI's import
CSV_TYPES = ("text/csv", "application/csv")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                "Cache-Control": "no-cache"}  # revalidate: a new release is seen at once


class Static(StaticFiles):
    """The page's files, with the page's security headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        """The file (or 404/304) with CSP and friends."""
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


async def index(request: Request) -> Response:
    """GET /: the dashboard page (no token needed to load it; every data request needs one)."""
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


PAGES = [Route("/", index, methods=["GET"]),
         Mount("/static", app=Static(directory=STATIC_DIR), name="static")]


async def audit_log(request: Request) -> Response:
    """GET /broadcasts/{id}/audit: every transition of the broadcast, oldest first."""
    who = auth.principal(request)
    row = await db.one(context.pool(request), "dashboard_audit_log",
                       {"account": who.account, "id": context.broadcast_id(request)})
    if row is None:
        raise errors.NotFound(context.NO_BROADCAST)
    return http.Json({"audit_log": row["audit_log"]})


async def audience(request: Request) -> Response:
    """GET /broadcasts/{id}/audience: how many contacts a send would reach right now."""
    who = auth.principal(request)
    with segments.filter_errors():  # its saved segment deleted since: 422 naming it
        row = await db.one(context.pool(request), "dashboard_audience",
                           {"account": who.account, "id": context.broadcast_id(request)})
    if row is None:
        raise errors.NotFound(context.NO_BROADCAST)
    return http.Json({"status": row["status"], "tag": row["segment_tag"],
                      "audience": int(row["audience"])})


async def _spool(request: Request, path: Path) -> None:
    # the body goes to disk as it arrives: memory stays flat whatever the upload's size
    with path.open("wb") as out:
        async for chunk in http.chunks(request, MAX_IMPORT_BYTES,
                                       f"the CSV is larger than {MAX_IMPORT_BYTES} bytes; "
                                       "split it"):
            out.write(chunk)


API_ENCODING = ("charset", "Content-Type: text/csv; charset=latin-1")  # for the errors


def _charset(content_type: str) -> str:
    """The charset parameter of a Content-Type (UTF-8 when none is given)."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"'):
            return value.strip().strip('"')
    return "utf-8"


def _parse(path: Path, charset: str) -> contacts.Batch:
    # the CLI's own reader and checks (sql.contacts), so both report the same rows the same way
    try:
        return contacts.validate(contacts.read_csv(path, charset, API_ENCODING))
    except sql_errors.InvalidInput as exc:
        # the reader names its file; the caller knows it as the request body
        raise errors.InvalidBody(str(exc).replace(str(path), "the CSV body")) from None
    except UnicodeDecodeError as exc:  # a bad byte the reader does not catch itself
        raise errors.InvalidBody(f"the CSV body is not UTF-8: byte {exc.start + 1} "
                                 f"cannot be decoded; nothing was imported") from None


async def import_csv(request: Request) -> Response:
    """POST /contacts/import: a CSV body (email,name,tags) upserted as `pgcast contacts import`."""
    who = auth.principal(request)
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media not in CSV_TYPES:
        raise errors.UnsupportedMediaType("send the file as Content-Type: text/csv")
    charset = _charset(content_type)  # checked by the reader, before anything is written
    fd, name = tempfile.mkstemp(prefix="pgcast-import-", suffix=".csv")
    os.close(fd)
    path = Path(name)
    try:
        await _spool(request, path)
        batch = await anyio.to_thread.run_sync(_parse, path, charset)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    written = 0
    if batch.rows:
        # one transaction: a failure half-way imports nothing, as the CLI's
        async with context.pool(request).connection() as conn, conn.transaction():
            await db.limit_lock_wait(conn)  # the erasure lock: bounded (db.ERASURE_LOCKED)
            if len(batch.rows) > UPSERT_CHUNK:
                # lock order: every existing contact, in id order, before a chunk's fence
                await conn.execute(db.query("contacts_lock"), {
                    "account": who.account, "keys": [r["email"].lower() for r in batch.rows]})
            for start in range(0, len(batch.rows), UPSERT_CHUNK):
                chunk = batch.rows[start:start + UPSERT_CHUNK]
                cur = await conn.execute(db.query("contacts_upsert"),
                                         {"account": who.account, "rows": json.dumps(chunk),
                                          "replace": False})
                written += cur.rowcount
    rejected: list[dict[str, Any]] = [{"line": r.where, "email": r.email, "reason": r.reason}
                                      for r in batch.rejected]
    return http.Json({"imported": written, "rejected": rejected})
