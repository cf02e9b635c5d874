"""Shared helpers of the API tests (no tests here): settings, tokens, clients, SSE reading."""

from __future__ import annotations

import contextlib
import functools
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import anyio.from_thread
import httpx
import jwt

from pgcast.api import app as api_app
from pgcast.api import config

SECRET = "test-secret-0123456789-abcdefghijklmnop"  # 39 bytes
ACCOUNT = "acme"


def settings(**env: str) -> config.Settings:
    """Settings as `pgcast api` would read them, HS256 unless told otherwise."""
    base = {"PGCAST_JWT_SECRET": SECRET, "PGCAST_API_EVENTS_INTERVAL": "0.05"}
    if "PGCAST_JWT_PUBLIC_KEY" in env:
        del base["PGCAST_JWT_SECRET"]
    return config.from_env({**base, **env})


def token(account: str | None = ACCOUNT, sub: str = "tester", ttl: float = 600,
          key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    """A signed token; account=None leaves the claim out."""
    now = int(time.time())
    body: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl), **claims}
    if account is not None:
        body["account"] = account
    return jwt.encode(body, key, algorithm=algorithm)


def auth(account: str | None = ACCOUNT, **kw: Any) -> dict[str, str]:
    """The Authorization header for a fresh token."""
    return {"Authorization": f"Bearer {token(account, **kw)}"}


class Api:
    """A synchronous face on httpx.AsyncClient + ASGITransport (one event loop per client).

    starlette.testclient now wants the httpx2 package; this keeps the tests on httpx.
    """

    def __init__(self, portal: anyio.from_thread.BlockingPortal, client: httpx.AsyncClient,
                 app: Any) -> None:
        self.portal, self.client, self.app = portal, client, app
        self.headers = client.headers

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """One request through the app."""
        return self.portal.call(functools.partial(self.client.request, method, url, **kw))

    def get(self, url: str, **kw: Any) -> httpx.Response:
        """GET."""
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        """POST."""
        return self.request("POST", url, **kw)

    def patch(self, url: str, **kw: Any) -> httpx.Response:
        """PATCH."""
        return self.request("PATCH", url, **kw)

    def put(self, url: str, **kw: Any) -> httpx.Response:
        """PUT."""
        return self.request("PUT", url, **kw)

    def delete(self, url: str, **kw: Any) -> httpx.Response:
        """DELETE."""
        return self.request("DELETE", url, **kw)


@contextlib.contextmanager
def client(db_url: str, s: config.Settings | None = None) -> Iterator[Api]:
    """A client of the real app; the app's lifespan opens its pool on this test's database."""
    app = api_app.create_app(s or settings(), db_url)
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
    with anyio.from_thread.start_blocking_portal() as portal, \
            portal.wrap_async_context_manager(app.router.lifespan_context(app)), \
            portal.wrap_async_context_manager(c):
        yield Api(portal, c, app)


async def sse(app: Any, path: str, headers: dict[str, str],
              on_event: Callable[[str, Any], None]) -> int:
    """Run an SSE request through the app, calling on_event(event, data) as each event is sent
    (raw ASGI: nothing is buffered); returns the response status."""
    import anyio

    send_chunk, receive_chunk = anyio.create_memory_object_stream[dict[str, Any]](100)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
             "http_version": "1.1", "method": "GET", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80), "app": app}
    never = anyio.Event()
    status = 0

    async def receive() -> dict[str, Any]:
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await send_chunk.send(message)

    async def run() -> None:
        with send_chunk:
            await app(scope, receive, send)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        buffer = ""
        with receive_chunk:
            async for message in receive_chunk:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    continue
                buffer += message.get("body", b"").decode()
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    lines = dict(line.split(": ", 1) for line in block.splitlines()
                                 if ": " in line and not line.startswith(":"))
                    if "event" in lines:
                        on_event(lines["event"], json.loads(lines["data"]))
    return status


def api_up(url: str) -> bool:
    """Whether a `pgcast api` at url answers /healthz."""
    try:
        urllib.request.urlopen(f"{url}/healthz", timeout=1).close()
        return True
    except OSError:
        return False
