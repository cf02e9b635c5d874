"""What every route needs: the pool, the settings, the path's broadcast id."""

from __future__ import annotations

import uuid

from starlette.requests import HTTPConnection

from pgcast.api import config, db, errors
from pgcast.sql import broadcasts
from pgcast.sql import errors as sql_errors

NO_BROADCAST = "broadcast not found"  # the same text for unknown ids and other accounts' ids


def pool(conn: HTTPConnection) -> db.Pool:
    """The app's connection pool."""
    p: db.Pool = conn.app.state.pool
    return p


def settings(conn: HTTPConnection) -> config.Settings:
    """The app's settings."""
    s: config.Settings = conn.app.state.settings
    return s


def stopping(conn: HTTPConnection) -> bool:
    """Whether the server is shutting down (long-lived responses should end)."""
    return bool(getattr(conn.app.state, "stopping", False))


def broadcast_id(conn: HTTPConnection) -> uuid.UUID:
    """The {id} path parameter; a malformed id is just another unknown id (404)."""
    try:
        return broadcasts.parse_id(conn.path_params["id"])
    except sql_errors.InvalidInput:
        raise errors.NotFound(NO_BROADCAST) from None
