"""Errors raised by the data-access layer."""

from __future__ import annotations


class PgcastError(Exception):
    """Base of every pgcast error."""


class InvalidInput(PgcastError):
    """The caller's input is malformed; nothing was changed."""


class NotFound(PgcastError):
    """No such broadcast or contact in this account."""


class EmbeddedServerError(PgcastError):
    """The embedded Postgres could not be started or stopped."""
