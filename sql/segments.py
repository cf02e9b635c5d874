"""Segments: filters over an account's contacts, saved by name, shared by the CLI and the API.

The filter language is compiled and validated in one place, the SQL function
pgcast_segment_sql_v2 (schema/0018_segments.sql, v2 in 0020_tracking.sql), so a send (inside
its snapshot), a count, the API and a DBA all read a filter the same way. This module bounds
what is sent to it, turns its errors (SQLSTATE PGS22, the JSON path first) into InvalidInput,
and runs the named queries.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg

from pgcast.sql import errors
from pgcast.sql.queries import QUERIES

FILTER_ERROR = "PGS22"  # SQLSTATE of pgcast_segment_error_v1
MAX_BYTES = 16384  # a filter as compact JSON; the SQL compiler checks the same
MAX_NESTING = 24  # JSON nesting read here before the compiler's own limit of 10 conditions
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # the segments_name_check
COUNT_TIMEOUT_MS = 10_000  # a count (CLI, API, dashboard) longer than this is cancelled


def dumps(value: Any) -> str:
    """A filter as compact JSON text."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def bounded(value: Any) -> str:
    """A filter as JSON text, if it is a JSON object small and shallow enough to hand to the
    compiler; raises InvalidInput (naming `$`)."""
    if not isinstance(value, dict):
        raise errors.InvalidInput("$: a filter must be a JSON object")
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:  # iterative: a deep value cannot exhaust Python's stack here
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            raise errors.InvalidInput("$: too deep: at most 10 levels of nesting")
        texts = [*item, *(v for v in item.values() if isinstance(v, str))] \
            if isinstance(item, dict) else [v for v in item if isinstance(v, str)] \
            if isinstance(item, list) else []
        for text in texts:  # what jsonb cannot hold, refused here rather than by the server
            if "\x00" in text or not _encodable(text):
                raise errors.InvalidInput(f"$: a text holds NUL or a lone surrogate: {text!r}")
        children = item.values() if isinstance(item, dict) else (
            item if isinstance(item, list) else ())
        stack.extend((child, depth + 1) for child in children)
    text = dumps(value)
    if len(text.encode()) > MAX_BYTES:
        raise errors.InvalidInput(f"$: too large: a filter is at most {MAX_BYTES} bytes of JSON")
    return text


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse(raw: str, where: str = "filter") -> Any:
    """A filter given as JSON text (the CLI's argument or file); raises InvalidInput."""
    if len(raw.encode()) > 4 * MAX_BYTES:
        raise errors.InvalidInput(f"{where}: too large: a filter is at most {MAX_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise errors.InvalidInput(f"{where} is not JSON: {exc}") from None


def check_name(raw: Any) -> str:
    """A segment name: 1-64 letters, digits, `_`, `.`, `-` (not first); raises InvalidInput."""
    if not isinstance(raw, str) or not NAME.match(raw):
        raise errors.InvalidInput(f"not a segment name: {raw!r} (1-64 letters, digits, "
                                  "'_', '.' or '-', starting with a letter or digit)")
    return raw


def is_filter_error(exc: BaseException) -> bool:
    """Whether a database error is the compiler's refusal of a filter."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate == FILTER_ERROR


def message(exc: psycopg.Error) -> str:
    """The compiler's message: the JSON path, then what is wrong."""
    return exc.diag.message_primary or str(exc).splitlines()[0]


@contextlib.contextmanager
def filter_errors() -> Iterator[None]:
    """The compiler's refusal (PGS22) as InvalidInput: exit 2 in the CLI, 422 in the API."""
    try:
        yield
    except psycopg.Error as exc:
        if not is_filter_error(exc):
            raise
        raise errors.InvalidInput(message(exc)) from None


def audience(segment: Any = None, filter_value: Any = None, tag: Any = None) -> Any:
    """A broadcast's segment_filter from the one of segment name / filter / tag given (a tag
    stays in segment_tag); raises InvalidInput when more than one is given."""
    given = [k for k, v in (("segment", segment), ("filter", filter_value), ("tag", tag))
             if v is not None]
    if len(given) > 1:
        raise errors.InvalidInput(f"give one of segment, filter or tag, not {' and '.join(given)}")
    if segment is not None:
        return {"segment": check_name(segment)}
    return filter_value


def check(conn: psycopg.Connection[Any], account: str, value: Any) -> dict[str, Any]:
    """A filter compiled for the account (its saved segments must exist): the filter with
    them expanded; raises InvalidInput naming the JSON path."""
    text = bounded(value)
    with filter_errors():
        row = conn.execute(QUERIES["segment_check"], {"account": account, "filter": text})
        found = row.fetchone()
    assert found is not None
    expanded: dict[str, Any] = dict(found)["expanded"] if isinstance(found, dict) else found[0]
    return expanded


def too_slow() -> errors.InvalidInput:
    """The answer to a count cancelled at COUNT_TIMEOUT_MS."""
    return errors.InvalidInput(f"$: counting this filter took longer than "
                               f"{COUNT_TIMEOUT_MS / 1000:g} s; narrow it (a tag is indexed)")


def count(conn: psycopg.Connection[Any], account: str, value: Any) -> int:
    """How many mailable contacts of the account the filter selects, in at most
    COUNT_TIMEOUT_MS (else InvalidInput)."""
    text = bounded(value)
    try:
        with filter_errors(), conn.transaction():
            conn.execute(QUERIES["segment_count_limit"], {"ms": COUNT_TIMEOUT_MS})
            found = conn.execute(QUERIES["segment_count"],
                                 {"account": account, "filter": text}).fetchone()
    except psycopg.errors.QueryCanceled:
        raise too_slow() from None
    assert found is not None
    return int(dict(found)["count"] if isinstance(found, dict) else found[0])


def save(conn: psycopg.Connection[Any], account: str, name: Any, value: Any) -> dict[str, Any]:
    """Create or replace a saved segment; raises InvalidInput (a filter that does not compile,
    or one that refers to itself)."""
    params = {"account": account, "name": check_name(name), "filter": bounded(value)}
    with filter_errors():
        found = conn.execute(QUERIES["segment_save"], params).fetchone()
    assert found is not None
    return _row(found, ("account", "name", "filter", "created_at", "updated_at", "inserted"))


def get(conn: psycopg.Connection[Any], account: str, name: Any) -> dict[str, Any]:
    """One saved segment; raises NotFound."""
    found = conn.execute(QUERIES["segment_get"],
                         {"account": account, "name": check_name(name)}).fetchone()
    if found is None:
        raise errors.NotFound(f"no saved segment {name}")
    return _row(found, ("name", "filter", "created_at", "updated_at"))


def list_all(conn: psycopg.Connection[Any], account: str) -> list[dict[str, Any]]:
    """An account's saved segments by name."""
    return [_row(r, ("name", "filter", "created_at", "updated_at"))
            for r in conn.execute(QUERIES["segment_list"], {"account": account})]


def users(conn: psycopg.Connection[Any], account: str, name: str) -> list[str]:
    """What refers to a saved segment ("segment NAME", "broadcast ID")."""
    rows = conn.execute(QUERIES["segment_users"], {"account": account, "name": name})
    return [" ".join(str(v) for v in (_row(r, ("kind", "what")).values())) for r in rows]


def refused_delete(name: str, used_by: list[str]) -> str:
    """Why a saved segment was not deleted."""
    return (f"segment {name} is used by {', '.join(used_by)}: change those first "
            "(a sent broadcast keeps its own copy and never needs it)")


def delete(conn: psycopg.Connection[Any], account: str, name: Any) -> dict[str, Any]:
    """Delete a saved segment nothing refers to; raises NotFound."""
    name = check_name(name)
    used_by = users(conn, account, name)
    if used_by:
        return {"success": False, "name": name, "used_by": used_by,
                "message": refused_delete(name, used_by)}
    if conn.execute(QUERIES["segment_delete"], {"account": account, "name": name}).fetchone() \
            is None:
        raise errors.NotFound(f"no saved segment {name}")
    return {"success": True, "name": name, "message": f"Segment {name} deleted"}


def _row(row: Any, names: tuple[str, ...]) -> dict[str, Any]:
    # the CLI's connections return tuples, the API's dicts
    return dict(row) if isinstance(row, dict) else dict(zip(names, row, strict=True))
