"""The API's Prometheus metrics: requests by route and status, and their latency (ASGI)."""

from __future__ import annotations

import time
from typing import Any

import prometheus_client as prom
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = prom.Counter("pgcast_api_requests", "HTTP requests by method, route and status",
                        ["method", "route", "status"])
SECONDS = prom.Histogram("pgcast_api_request_seconds",
                         "time from request to the end of the response, by route "
                         "(an event stream's whole life)", ["route"])
METHODS = frozenset({"GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS"})


def route_of(scope: Scope) -> str:
    """The route's path template (`/broadcasts/{id}`), never the path itself: a bounded label."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    endpoint = scope.get("endpoint")
    return getattr(endpoint, "__name__", "unmatched") if endpoint else "unmatched"


class Metered:
    """Counts and times every HTTP request of the app it wraps."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request through, measured."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before responding

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            route = route_of(scope)
            method = scope["method"] if scope["method"] in METHODS else "other"
            REQUESTS.labels(method, route, str(status)).inc()
            SECONDS.labels(route).observe(time.perf_counter() - started)
