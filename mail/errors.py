"""Errors raised by message composition and input validation."""

from __future__ import annotations


class MailError(Exception):
    """Base of every mail error."""


class InvalidValue(MailError):
    """A value cannot be stored or put into a message; `field` names it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
