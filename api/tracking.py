"""GET /c/{token} (a click: 302 to the stored URL), GET /o/{token} (an open: a 1x1 image),
GET /broadcasts/{id}/stats (the report).

No JWT: the signed token is the credential. The redirect's target is always the URL stored
for the token's broadcast and link index (broadcast_links), never anything in the request,
so /c/ is no open redirect; a token that is malformed, truncated, forged, or names a link its
broadcast does not have answers 404 with a plain page. Links never change once stored, so
each process keeps them in memory after the first read (the most recently used, up to CACHE
broadcasts and CACHE_CHARS characters).
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import time
import uuid

import psycopg
import psycopg_pool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pgcast.api import auth, context, db, errors, http, ses_events, tracking_events
from pgcast.api import unsubscribe as unsubscribe_routes
from pgcast.mail import tracking
from pgcast.sql import tracking as sql_tracking

CACHE = 1024  # broadcasts whose links a process keeps
# characters of URLs and Location values a process keeps (a tenant's broadcast may hold 500
# links of 2,048 bytes: 1,024 of them by count alone would be gigabytes)
CACHE_CHARS = 32 * 1024 * 1024
NOT_FOUND = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             "<meta name=\"robots\" content=\"noindex\"><title>Link not found</title></head>"
             "<body><h1>Link not found</h1><p>This link is not valid.</p></body></html>\n")
PIXEL = base64.b64decode(b"R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")  # 1x1 GIF
_PRIVATE = {"Cache-Control": "no-store, private", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff"}
_PAGE_HEADERS = {**_PRIVATE, "Content-Security-Policy": "default-src 'none'",
                 "X-Frame-Options": "DENY"}

# the broadcast's mode, its URLs by index, and each one's Location value (made once)
Links = tuple[str, tuple[str | None, ...], tuple[str | None, ...]]


def _not_found() -> Response:
    return Response(NOT_FOUND, status_code=404, media_type="text/html; charset=utf-8",
                    headers=_PAGE_HEADERS)


def recorder(app: Starlette) -> tracking_events.Recorder:
    """The app's event buffer (made on first use)."""
    found: tracking_events.Recorder | None = getattr(app.state, "tracking_recorder", None)
    if found is None:
        found = tracking_events.Recorder(app.state.pool)
        app.state.tracking_recorder = found
    return found


async def close(app: Starlette) -> None:
    """Write the buffered events (the lifespan's end)."""
    found: tracking_events.Recorder | None = getattr(app.state, "tracking_recorder", None)
    if found is not None:
        await found.close()


async def _links(app: Starlette, bid: uuid.UUID) -> Links | None:
    cache: collections.OrderedDict[uuid.UUID, Links] | None = getattr(
        app.state, "tracking_links", None)
    if cache is None:
        cache = collections.OrderedDict()
        app.state.tracking_links = cache
    found = cache.get(bid)
    if found is not None:
        cache.move_to_end(bid)
        return found
    rows = await db.all_rows(app.state.pool, "tracking_links", {"id": bid})
    if not rows:
        return None  # no such broadcast: not cached (a token we signed names one)
    urls: list[str | None] = [None] * (max((r["idx"] for r in rows if r["idx"] is not None),
                                           default=-1) + 1)
    for r in rows:
        if r["idx"] is not None:
            urls[r["idx"]] = r["url"]
    found = (rows[0]["track"], tuple(urls),
             tuple(tracking.location(u) if u is not None else None for u in urls))
    if urls:  # a broadcast with no links yet may store them later: only then cached
        cache[bid] = found
        held: int = getattr(app.state, "tracking_links_chars", 0) + _chars(found)
        while len(cache) > 1 and (len(cache) > CACHE or held > CACHE_CHARS):
            held -= _chars(cache.popitem(last=False)[1])
        app.state.tracking_links_chars = held
    return found


def _chars(links: Links) -> int:
    """The characters one broadcast's cached links hold (URLs and Location values)."""
    return sum(len(u) for u in links[1] if u is not None) + sum(
        len(u) for u in links[2] if u is not None)


async def _ref(request: Request, kind: int) -> tracking.Ref | None:
    keys = await unsubscribe_routes.keys(request)
    try:
        ref = tracking.read(keys, str(request.path_params.get("token", "")))
    except tracking.InvalidToken:
        return None
    return ref if ref.kind == kind else None


def _record(request: Request, ref: tracking.Ref, kind: str, links: int) -> None:
    now = time.time()
    recorder(request.app).add(tracking_events.Event(
        ref.broadcast_id, kind, ref.link, ref.contact_id, ref.message,
        dt.datetime.fromtimestamp(now, dt.UTC),
        # a HEAD is a scanner's (a browser GETs)
        tracking_events.classify(ref, request.headers.get("user-agent"), now)
        or request.method == "HEAD", links))


async def click(request: Request) -> Response:
    """GET /c/{token}: 302 to the link's stored URL, the click recorded; 404 otherwise."""
    ref = await _ref(request, tracking.KIND_CLICK)
    if ref is None or ref.link is None:
        return _not_found()
    found = await _links(request.app, ref.broadcast_id)
    if found is None or ref.link >= len(found[1]):
        return _not_found()
    url = found[1][ref.link]
    if url is None or not url.lower().startswith(("https://", "http://")):
        return _not_found()
    _record(request, ref, "click", sum(1 for u in found[1] if u is not None))
    return Response(status_code=302, headers={**_PRIVATE, "Location": found[2][ref.link] or ""})


async def record_ses(app: Starlette, event: ses_events.Event) -> None:
    """An SES Open or Click event (its configuration set publishes them), counted with
    pgcast's own: a click on one of the broadcast's stored links (not on pgcast's own /c/
    URLs, which the redirect counts), machine by the same User-Agent and timing rules."""
    if event.broadcast is None or event.contact is None:
        return
    found = await _links(app, event.broadcast)
    if found is None or found[0] == "none":
        return
    link = None
    if event.event == "click":
        if event.link is None or event.link not in found[1] or tracking.own(
                event.link, unsubscribe_routes.configured_url()):
            return
        link = found[1].index(event.link)
    sent = event.sent_at or event.at
    machine = (tracking_events.machine_agent(event.user_agent)
               or (event.at - sent).total_seconds() < tracking_events.QUICK)
    recorder(app).add(tracking_events.Event(
        event.broadcast, event.event, link, event.contact, event.contact, event.at, machine,
        sum(1 for u in found[1] if u is not None), source="ses"))


async def open_pixel(request: Request) -> Response:
    """GET /o/{token}: a 1x1 GIF, the open recorded; 404 for a token we did not make."""
    ref = await _ref(request, tracking.KIND_OPEN)
    if ref is None:
        return _not_found()
    _record(request, ref, "open", 0)
    return Response(PIXEL, media_type="image/gif", headers=_PRIVATE)


class FastPath:
    """ASGI middleware: GET /c/ and /o/ answered before the JWT middleware and the router.

    They need neither (the token in the path is the credential) and they are the routes a
    whole list of subscribers hits; every other request goes on as before. A database that
    cannot be reached answers 503 (the links of a broadcast not yet in this process's cache
    are read from it).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path[:3] not in ("/c/", "/o/") or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        scope["path_params"] = {"token": path[3:]}
        request = Request(scope, receive)
        try:
            response = await (click(request) if path[1] == "c" else open_pixel(request))
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout):
            response = Response("unavailable: retry later\n", status_code=503,
                                media_type="text/plain", headers={"Retry-After": "1"})
        await response(scope, receive, send)


async def stats(request: Request) -> Response:
    """GET /broadcasts/{id}/stats: delivery, opens, clicks, per link, and the hourly series."""
    who = auth.principal(request)
    bid = context.broadcast_id(request)
    pool = context.pool(request)
    head = await db.one(pool, "tracking_stats_head", {"id": bid, "account": who.account})
    if head is None:
        raise errors.NotFound(context.NO_BROADCAST)
    params = {"id": bid}
    return http.Json(sql_tracking.report(
        head, await db.all_rows(pool, "tracking_stats_counts", params),
        await db.all_rows(pool, "tracking_stats_series", params),
        await db.all_rows(pool, "tracking_stats_links", params)))
