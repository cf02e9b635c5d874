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


class TemplateInvalid(MailError):
    """A template cannot be accepted (syntax, unknown name); `part` and `line` say where."""

    def __init__(self, part: str, line: int | None, reason: str) -> None:
        where = f"{part}, line {line}" if line else part
        super().__init__(f"{where}: {reason}")
        self.part = part
        self.line = line
        self.reason = reason


class RenderError(MailError):
    """One recipient's message cannot be built (a template error, an output bound)."""


class RenderBudget(RenderError):
    """A render stopped for going over its budget; `budget` names which one."""

    def __init__(self, budget: str, detail: str) -> None:
        super().__init__(f"render budget exceeded ({budget}): {detail}")
        self.budget = budget
        self.detail = detail
