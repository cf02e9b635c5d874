"""The Starlette application: routes, JWT middleware, error handlers, the pool's lifespan."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import psycopg_pool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pgcast.api import (
    auth,
    broadcasts,
    config,
    contacts,
    context,
    control,
    db,
    errors,
    hooks,
    http,
    openapi,
    subscriber_pages,
    wake,
)
from pgcast.api import bounds as body_bounds
from pgcast.api import dashboard_routes as dashboard
from pgcast.api import forms as forms_routes
from pgcast.api import messages as message_routes
from pgcast.api import preview as preview_routes
from pgcast.api import progress as progress_routes
from pgcast.api import schedule as schedule_routes
from pgcast.api import segments as segment_routes
from pgcast.api import suppression as suppression_routes
from pgcast.api import testsend as testsend_routes
from pgcast.api import tracking as tracking_routes
from pgcast.api import unsubscribe as unsubscribe_routes
from pgcast.api import webhooks as webhook_routes
from pgcast.mail import renderpool
from pgcast.sql import errors as sql_errors

log = logging.getLogger("pgcast.api")


async def healthz(request: Request) -> Response:
    """GET /healthz: no auth; 200 when Postgres answers."""
    await db.one(context.pool(request), "api_health", {})
    return http.Json({"status": "ok"})


async def openapi_json(request: Request) -> Response:
    """GET /openapi.json."""
    return http.Json(request.app.state.openapi)


Endpoint = Callable[[Request], Awaitable[Response]]


def _query_names(path: str, method: str) -> frozenset[str]:
    """The query parameters the OpenAPI document declares for one operation."""
    operation = openapi.document()["paths"].get(path, {}).get(method.lower(), {})
    return frozenset(p["name"] for p in operation.get("parameters", []) if p["in"] == "query")


def route(path: str, *, any_query: bool = False, **by_method: Endpoint) -> Route:
    """One Route per path (so a 405 lists every allowed method in Allow), dispatched by method."""
    # any_query: a page people reach from a link (/u/), where a mail client or a tracker may
    # add parameters (utm_source): they are ignored there, not refused
    allowed = {method: _query_names(path, method) for method in by_method}

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method  # Starlette adds HEAD
        if any_query:  # its one path parameter is a token the route checks (400 page)
            return await by_method[method](request)
        # unknown or repeated query parameters are refused, as unknown JSON fields are
        names = [k for k, _ in request.query_params.multi_items()]
        unknown = sorted(set(names) - allowed[method])
        if unknown:
            raise errors.InvalidBody(f"unknown query parameter: {unknown[0]!r}")
        if len(names) != len(set(names)):
            raise errors.InvalidBody("a query parameter is repeated")
        http.check_url(request)  # NUL or a lone surrogate: bad input, never a 500
        return await by_method[method](request)

    endpoint.__name__ = "_".join(f.__name__ for f in by_method.values())
    return Route(path, endpoint, methods=list(by_method))


ROUTES = [
    route("/healthz", GET=healthz),
    route("/openapi.json", GET=openapi_json),
    route("/contacts", GET=contacts.list_page, POST=contacts.upsert),
    route("/contacts/unsubscribe", POST=contacts.unsubscribe),
    route("/contacts/resubscribe", POST=contacts.resubscribe),
    route("/contacts/erase", POST=contacts.erase),
    route("/broadcasts", GET=broadcasts.list_page, POST=broadcasts.create),
    route("/broadcasts/{id}", GET=broadcasts.get, PATCH=broadcasts.update,
          DELETE=broadcasts.delete),
    route("/broadcasts/{id}/send", POST=control.send),
    route("/broadcasts/{id}/cancel", POST=control.cancel),
    route("/broadcasts/{id}/pause", POST=control.pause),
    route("/broadcasts/{id}/resume", POST=control.resume),
    route("/broadcasts/{id}/progress", GET=progress_routes.progress),
    route("/broadcasts/{id}/events", GET=progress_routes.events),
    route("/broadcasts/{id}/recipients", GET=progress_routes.recipients),
    route("/broadcasts/{id}/schedule", POST=schedule_routes.schedule_route),
    route("/broadcasts/{id}/unschedule", POST=schedule_routes.unschedule_route),
    route("/broadcasts/{id}/retry", POST=schedule_routes.retry_route),
    route("/broadcasts/{id}/copy", POST=schedule_routes.copy_route),
    route("/broadcasts/{id}/audit", GET=dashboard.audit_log),
    route("/broadcasts/{id}/audience", GET=dashboard.audience),
    route("/contacts/import", POST=dashboard.import_csv),
    route("/broadcasts/{id}/preview", GET=preview_routes.show),
    route("/broadcasts/{id}/test", POST=testsend_routes.create, GET=testsend_routes.status),
    route("/u/{token}", any_query=True, GET=unsubscribe_routes.page,
          POST=unsubscribe_routes.one_click),
    route("/contacts/suppressed", GET=suppression_routes.suppressed),
    route("/contacts/unsuppress", POST=suppression_routes.unsuppress),
    route("/webhooks/ses", POST=webhook_routes.ses),
    route("/c/{token}", any_query=True, GET=tracking_routes.click),
    route("/o/{token}", any_query=True, GET=tracking_routes.open_pixel),
    route("/broadcasts/{id}/stats", GET=tracking_routes.stats),
    route("/segments", GET=segment_routes.list_all, POST=segment_routes.save),
    route("/segments/count", POST=segment_routes.count),  # before {name}: a POST here
    route("/segments/{name}", GET=segment_routes.get, DELETE=segment_routes.delete),
    *forms_routes.routes(route),
    route("/messages", POST=message_routes.create),
    route("/messages/{id}", GET=message_routes.get),
    # outgoing webhooks (api/hooks.py)
    route("/webhooks", GET=hooks.list_all, POST=hooks.create),
    *map(hooks.uuid_ids, [
        route("/webhooks/{id}", DELETE=hooks.remove),
        route("/webhooks/{id}/rotate-secret", POST=hooks.rotate),
        route("/webhooks/{id}/enable", POST=hooks.enable),
        route("/webhooks/{id}/deliveries", GET=hooks.deliveries),
        route("/webhooks/{id}/deliveries/{delivery_id}/redeliver", POST=hooks.redeliver)]),
]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ApiError)
    return http.Json(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def _invalid_input(request: Request, exc: Exception) -> Response:
    return http.Json(errors.InvalidBody(str(exc)).body(), status_code=422)


async def _unavailable(request: Request, exc: Exception) -> Response:
    log.warning("database unavailable: %s", exc)
    return http.Json(errors.Unavailable("the database is unavailable; retry later").body(),
                     status_code=503, headers={"Retry-After": "1"})


async def _lock_busy(request: Request, exc: Exception) -> Response:
    busy = errors.LockBusy(f"waited {db.LOCK_WAIT} ms for a lock another operation on the "
                           "account holds (an erase, an import or a send); retry later",
                           headers={"Retry-After": "5"})
    return http.Json(busy.body(), status_code=busy.status_code, headers=busy.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
    return http.Json({"error": code, "message": str(exc.detail)}, status_code=exc.status_code,
                     headers=exc.headers)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    errors.ApiError: _api_error,
    sql_errors.InvalidInput: _invalid_input,
    psycopg_pool.PoolTimeout: _unavailable,
    psycopg.errors.LockNotAvailable: _lock_busy,  # lock_timeout (db.LOCK_WAIT): before 503 below
    psycopg.OperationalError: _unavailable,
    HTTPException: _http_error,
}


def create_app(settings: config.Settings, database_url: str) -> Starlette:
    """The app; its lifespan opens and closes the connection pool."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = db.make_pool(database_url, settings.pool_size)
        await pool.open(wait=False)  # /healthz says 503 until Postgres answers
        app.state.pool = pool
        app.state.render_pool = renderpool.RenderPool()  # processes start on first use
        app.state.waker = wake.Waker(pool)  # sign-ups' NOTIFYs, after their commits
        try:
            yield
        finally:
            await tracking_routes.close(app)  # buffered opens and clicks
            await app.state.waker.close()
            app.state.render_pool.close()
            await pool.close()

    subscriber_pages.check_env()  # PGCAST_TRUSTED_PROXIES
    app = Starlette(
        routes=[*ROUTES, *dashboard.PAGES, *subscriber_pages.PAGES], lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(tracking_routes.FastPath),  # /c/ and /o/: no JWT, no router
                    Middleware(body_bounds.BoundedBody),
                    Middleware(AuthenticationMiddleware, backend=auth.JWTBackend(settings),
                               on_error=auth.on_error)])
    app.state.settings = settings
    app.state.database_url = database_url  # procrastinate jobs are deferred on their own pool
    app.state.stopping = False  # set by the server on SIGTERM: SSE streams end
    app.state.openapi = openapi.document()
    app.state.feedback = webhook_routes.from_env()  # None: /webhooks/ses answers 404
    return app


def from_env() -> Starlette:
    """The app configured from the environment (uvicorn --factory api.app:from_env)."""
    from pgcast.sql import db as sql_db

    return create_app(config.from_env(), sql_db.database_url())
