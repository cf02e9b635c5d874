"""JSON in and out: bounded body reading, strict field checks, and the response encoder."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse

from pgcast.api import errors

MAX_BODY_BYTES = 8 * 1024 * 1024  # 10,000 contacts with names and tags fit easily

log = logging.getLogger("pgcast.api")
T = TypeVar("T")

# JSON types a field may have: the name shown in errors, and the Python check
STRING = ("a string", (str,))
STRING_OR_NULL = ("a string or null", (str, type(None)))
ARRAY = ("an array", (list,))
ARRAY_OR_NULL = ("an array or null", (list, type(None)))
OBJECT_OR_NULL = ("an object or null", (dict, type(None)))
BOOLEAN = ("true or false", (bool,))
INTEGER = ("an integer", (int,))  # bool is refused where the value is checked
Kind = tuple[str, tuple[type, ...]]


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


class Json(JSONResponse):
    """A JSON response that also encodes datetimes and UUIDs."""

    def render(self, content: Any) -> bytes:
        """Compact UTF-8 JSON."""
        return json.dumps(content, default=_default, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode()


def dumps(content: Any) -> str:
    """Compact JSON text (for SSE data lines)."""
    return json.dumps(content, default=_default, separators=(",", ":"))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)
_SPACE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, i: int) -> int:
    end: int = _SPACE.match(text, i).end()  # type: ignore[union-attr]  # always matches
    return end


def _expect(text: str, i: int, chars: str) -> str:
    if i >= len(text) or text[i] not in chars:
        raise ValueError(f"expected one of {chars!r} at offset {i}")
    return text[i]


def _array(text: str, i: int) -> tuple[list[Any], int]:
    """A JSON array starting at text[i] == '[', decoded one item per C call."""
    items: list[Any] = []
    i = _skip(text, i + 1)
    if text.startswith("]", i):
        return items, i + 1
    while True:
        item, i = _DECODER.raw_decode(text, i)
        items.append(item)
        i = _skip(text, i)
        if _expect(text, i, ",]") == "]":
            return items, i + 1
        i = _skip(text, i + 1)


def loads(raw: bytes) -> Any:
    """json.loads, in steps: the arrays of a top-level object are decoded one item at a time.

    One json.loads of 8 MiB holds the GIL for ~0.1 s (more on a loaded machine), during which
    the event loop cannot answer anything; one item at a time, the loop gets the GIL back at
    its switch interval (5 ms). Same values and same refusals as json.loads.
    """
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    i = _skip(text, 0)
    if not text.startswith("{", i):
        value, i = _DECODER.raw_decode(text, i)
    else:
        value = {}
        i = _skip(text, i + 1)
        if text.startswith("}", i):
            i += 1
        else:
            while True:
                _expect(text, i, '"')
                key, i = _DECODER.raw_decode(text, i)
                i = _skip(text, i)
                _expect(text, i, ":")
                i = _skip(text, i + 1)
                if text.startswith("[", i):
                    value[key], i = _array(text, i)
                else:
                    value[key], i = _DECODER.raw_decode(text, i)
                i = _skip(text, i)
                if _expect(text, i, ",}") == "}":
                    i += 1
                    break
                i = _skip(text, i + 1)
    if _skip(text, i) != len(text):
        raise ValueError(f"extra data at offset {i}")
    return value


async def off_loop(work: Callable[..., T], *args: Any) -> T:
    """Run CPU work (parsing, validating a body) in a worker thread, off the event loop.

    A pure-Python loop in a thread still lets the event loop take the GIL every switch
    interval (5 ms), so /healthz and every other request keep being answered while one big
    body is checked (the body is decoded in steps too: see loads).
    """
    return await anyio.to_thread.run_sync(work, *args)


def declared_length(headers: Mapping[str, str]) -> int | None:
    """The Content-Length a request declares (None: none, or chunked); raises InvalidBody."""
    raw = headers.get("content-length")
    if raw is None:
        return None
    if not raw.strip().isdigit() or len(raw) > 20:
        raise errors.MalformedJson("the Content-Length header is not a number")
    return int(raw)


async def chunks(request: Request, limit: int = MAX_BODY_BYTES,
                 too_large: str = "") -> AsyncIterator[bytes]:
    """The body as it arrives, refused (BodyTooLarge) as soon as it passes limit bytes.

    The one reader of request bodies: every route reads through it (or read_body), so no
    route buffers more than its limit, whatever the client sends; a declared Content-Length
    over the limit is refused before anything is read.
    """
    message = too_large or f"the body is larger than {limit} bytes"
    declared = declared_length(request.headers)
    if declared is not None and declared > limit:
        raise errors.BodyTooLarge(message)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.BodyTooLarge(message)
        yield chunk


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, at most limit bytes, bounded while it streams; raises BodyTooLarge."""
    return b"".join([chunk async for chunk in chunks(request, limit)])


async def read_optional_json(request: Request) -> Any:
    """The parsed body, or {} when it is empty (routes whose fields are all optional)."""
    raw = await read_body(request)
    return await off_loop(parse_json, raw) if raw.strip() else {}


def parse_json(raw: bytes) -> Any:
    """The parsed body; raises MalformedJson (details to the log only) or InvalidBody."""
    if not raw.strip():
        raise errors.MalformedJson("the body is empty; send a JSON object")
    try:
        value = loads(raw)
    except (ValueError, RecursionError) as exc:
        # the parser's own words stay in the log: the body says what, not how Python saw it
        log.info("malformed JSON body: %s", str(exc)[:200])
        raise errors.MalformedJson("the body is not valid JSON") from None
    try:
        _check_text(value)
    except RecursionError:
        raise errors.InvalidBody("the body is nested too deeply") from None
    return value


async def read_json(request: Request) -> Any:
    """The parsed body, parsed off the event loop; raises MalformedJson or BodyTooLarge."""
    return await off_loop(parse_json, await read_body(request))


def _check_text(value: Any) -> None:
    # Postgres text cannot hold NUL, and lone surrogates cannot be encoded as UTF-8
    if isinstance(value, str):
        if "\x00" in value:
            raise errors.InvalidBody("strings must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise errors.InvalidBody("strings must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, list):
        for item in value:
            _check_text(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check_text(item)


def fields(value: Any, where: str, required: Mapping[str, Kind],
           optional: Mapping[str, Kind] | None = None) -> dict[str, Any]:
    """An object with exactly these fields and types; raises InvalidBody listing every problem."""
    optional = optional or {}
    if not isinstance(value, dict):
        raise errors.InvalidBody(f"{where} must be a JSON object")
    problems: list[dict[str, Any]] = []
    for name in value:
        if name not in required and name not in optional:
            problems.append({"field": f"{where}.{name}", "problem": "unknown field"})
    for name, (label, types) in {**required, **optional}.items():
        if name not in value:
            if name in required:
                problems.append({"field": f"{where}.{name}", "problem": "required"})
        elif not isinstance(value[name], types) or (isinstance(value[name], bool)
                                                     and bool not in types):
            problems.append({"field": f"{where}.{name}", "problem": f"must be {label}"})
    if problems:  # every problem named, in the message and in details
        raise errors.InvalidBody("; ".join(f"{p['field']}: {p['problem']}" for p in problems),
                                 problems)
    return dict(value)


def bad_text(value: str) -> str | None:
    """Why Postgres text cannot hold value (NUL, a lone surrogate), else None."""
    if "\x00" in value:
        return "NUL"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "a lone surrogate"
    return None


def check_url(request: Request) -> None:
    """Refuse NUL or a lone surrogate in the path (404) or the query (400), on every route."""
    for value in request.path_params.values():
        if isinstance(value, str) and bad_text(value):
            raise errors.NotFound("not found")
    for key, value in request.query_params.multi_items():
        found = bad_text(key) or bad_text(value)
        if found:
            raise errors.BadParameter(f"query parameter {key[:40]!r} holds {found}")


def query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi]; raises InvalidBody."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.InvalidBody(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise errors.InvalidBody(f"{name} must be between {lo} and {hi}")
    return value
