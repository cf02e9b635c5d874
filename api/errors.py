"""Errors of the HTTP API: each maps to one status code and one JSON error body."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Base of every API error; carries its HTTP status and a short machine-readable code."""

    status_code = 500
    code = "error"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON error body: {"error", "message"[, "details"]}."""
        out: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class MalformedJson(ApiError):
    """The request body is not JSON."""

    status_code = 400
    code = "malformed_json"


class BadParameter(ApiError):
    """A query parameter, cursor or other value holds what no field may (NUL, a lone surrogate)."""

    status_code = 400
    code = "bad_parameter"


class InvalidBody(ApiError):
    """Well-formed JSON with a wrong type, a missing or an unknown field, or a bad value."""

    status_code = 422
    code = "invalid_request"


class BodyTooLarge(ApiError):
    """The request body is larger than the API accepts."""

    status_code = 413
    code = "body_too_large"


class Unauthorized(ApiError):
    """No verified caller (reached only if a route is served without the middleware)."""

    status_code = 401
    code = "unauthorized"


class NotFound(ApiError):
    """No such resource in the caller's account (other accounts' ids look exactly the same)."""

    status_code = 404
    code = "not_found"


class TooManyStreams(ApiError):
    """The account, or this process, has as many SSE streams open as it may."""

    status_code = 429
    code = "too_many_streams"


class Unavailable(ApiError):
    """Postgres cannot be reached or the pool is exhausted; retry later."""

    status_code = 503
    code = "unavailable"


class LockBusy(ApiError):
    """A lock the request needs stayed held past the API's lock wait (an erase runs); retry."""

    status_code = 503
    code = "busy"


class UnsupportedMediaType(ApiError):
    """The body is not of the media type the route reads (e.g. text/csv for an import)."""

    status_code = 415
    code = "unsupported_media_type"


class ConfigError(Exception):
    """The API's configuration is unusable (short secret, unreadable key, bad algorithm)."""

