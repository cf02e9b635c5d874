"""`pgcast api` (the HTTP API under uvicorn) and `pgcast token` (a development JWT)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
from types import FrameType
from typing import Any

from pgcast.api import auth, config
from pgcast.api import errors as api_errors
from pgcast.bin import logs, output
from pgcast.sql import errors as sql_errors

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_TTL = 3600  # seconds
GRACEFUL_SHUTDOWN = 5  # seconds: open SSE streams would otherwise hold SIGTERM off forever


# Bad configuration raises sql.errors.InvalidInput: bin.cli.main turns it into one line on
# stderr and exit 2 (bin.cli.UsageError would not match when the CLI runs as __main__).


def _settings() -> config.Settings:
    try:
        return config.from_env()
    except api_errors.ConfigError as exc:
        raise sql_errors.InvalidInput(str(exc)) from None


def make_token(account: str, sub: str = "dev", ttl: float = DEFAULT_TTL) -> str:
    """A token for `account` signed with PGCAST_JWT_SECRET (aud/iss from the environment)."""
    if not os.environ.get("PGCAST_JWT_SECRET"):
        # a public key verifies tokens but cannot sign one: name the only setting that can
        raise sql_errors.InvalidInput(
            "pgcast token signs with PGCAST_JWT_SECRET (HS256); it is not set "
            "(PGCAST_JWT_PUBLIC_KEY can verify tokens but not sign them)")
    try:
        return auth.make_token(_settings(), account, sub, ttl)
    except api_errors.ConfigError as exc:
        raise sql_errors.InvalidInput(str(exc)) from None


def cmd_token(args: argparse.Namespace) -> int:
    """Print a development token."""
    print(make_token(args.account, args.sub, args.ttl))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the API with uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    from pgcast.api import app as api_app
    from pgcast.sql import db

    if not 0 < args.port < 65536:
        raise sql_errors.InvalidInput(f"--port must be between 1 and 65535: {args.port}")
    settings = _settings()
    # bound before anything starts: a port in use is one line and exit 2, not a server that
    # says "startup complete" and then stops
    sock = _listen(args.host, args.port)
    if args.limit_concurrency is not None:
        least = config.MIN_LIMIT_CONCURRENCY
        if args.limit_concurrency < least:
            raise sql_errors.InvalidInput(
                f"--limit-concurrency must be at least {least}: {args.limit_concurrency}")
        settings = dataclasses.replace(settings, limit_concurrency=args.limit_concurrency)
    if args.timeout_keep_alive is not None:
        settings = dataclasses.replace(settings, timeout_keep_alive=args.timeout_keep_alive)
    level = os.environ.get("PGCAST_LOG_LEVEL", "info").lower()
    try:
        fmt = logs.log_format()
    except ValueError as exc:
        raise sql_errors.InvalidInput(str(exc)) from None
    # uvicorn's own loggers (startup lines, access log) hand their records to ours
    log_config = logs.dict_config(level, fmt, ("uvicorn", "uvicorn.error", "uvicorn.access"))
    try:
        application = api_app.create_app(settings, db.database_url())
    except api_errors.ConfigError as exc:  # PGCAST_SNS_* and the feedback limits
        raise sql_errors.InvalidInput(str(exc)) from None

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # open SSE streams see this and end, so the graceful shutdown finishes cleanly
            application.state.stopping = True
            super().handle_exit(sig, frame)

    served: Any = application
    if args.metrics_addr:
        from pgcast.api import metrics
        from pgcast.sql import metrics as sql_metrics

        _, port = sql_metrics.parse_addr(args.metrics_addr)
        if port == args.port:
            raise sql_errors.InvalidInput("--metrics-addr must not be the API's own port")
        sql_metrics.serve(args.metrics_addr, db.database_url())
        served = metrics.Metered(application)

    Server(uvicorn.Config(
        served, host=args.host, port=args.port, proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        # over the limit uvicorn answers 503; SSE streams are capped at half of it (api.streams)
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=int(math.ceil(settings.timeout_keep_alive)),
        log_level=level, log_config=log_config,
        access_log=os.environ.get("PGCAST_API_ACCESS_LOG", "0") == "1")).run(sockets=[sock])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The API's listening socket (as uvicorn would bind it); raises InvalidInput."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only for that proto (a
    # JSON answer is two sends; with Nagle on, the second waited ~40 ms for a delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise sql_errors.InvalidInput(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _port(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a port number, 1-65535 (flag or PGCAST_API_PORT): {raw!r}") from None


def _ttl(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {raw!r}")
    return value


def register(sub: Any) -> None:
    """Add `api` and `token` to the pgcast command line."""
    a = sub.add_parser("api", help="serve the HTTP API (uvicorn)")
    a.add_argument("--host", default=os.environ.get("PGCAST_API_HOST", DEFAULT_HOST),
                   help=f"listen address (default {DEFAULT_HOST}, env PGCAST_API_HOST)")
    # a string default goes through the type too: a bad PGCAST_API_PORT is one line, exit 2
    a.add_argument("--port", type=_port,
                   default=os.environ.get("PGCAST_API_PORT", str(DEFAULT_PORT)),
                   help=f"listen port (default {DEFAULT_PORT}, env PGCAST_API_PORT)")
    a.add_argument("--limit-concurrency", type=int, default=None, metavar="N",
                   help=f"connections and requests served at once; beyond it 503 (default "
                        f"{config.DEFAULT_LIMIT_CONCURRENCY}, env PGCAST_API_LIMIT_CONCURRENCY); "
                        f"SSE streams may use half of it")
    a.add_argument("--timeout-keep-alive", type=_ttl, default=None, metavar="S",
                   help=f"seconds an idle keep-alive connection stays open (default "
                        f"{config.DEFAULT_TIMEOUT_KEEP_ALIVE:g}, "
                        f"env PGCAST_API_TIMEOUT_KEEP_ALIVE)")
    a.add_argument("--metrics-addr", metavar="HOST:PORT",
                   default=os.environ.get("PGCAST_METRICS_ADDR") or None,
                   help="serve Prometheus metrics there, never on the API's port "
                        "(env PGCAST_METRICS_ADDR; default off)")
    a.set_defaults(func=cmd_api)

    t = sub.add_parser("token", help="print a JWT signed with PGCAST_JWT_SECRET (development)")
    t.add_argument("--account", default=output.ACCOUNT_DEFAULT,
                   help=f"the account (tenant) the token acts in (default "
                        f"{output.ACCOUNT_DEFAULT}, as the other commands)")
    t.add_argument("--sub", default="dev", help="the token's subject (default dev)")
    t.add_argument("--ttl", type=_ttl, default=float(DEFAULT_TTL),
                   help=f"lifetime in seconds (default {DEFAULT_TTL})")
    t.set_defaults(func=cmd_token)
