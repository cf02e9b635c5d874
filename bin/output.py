"""What the CLI prints: JSON (non-ASCII kept, ISO 8601 times) or a table on a terminal."""

from __future__ import annotations

import datetime as dt
import decimal
import getpass
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pgcast.sql import errors

ACCOUNT_DEFAULT = "default"  # the account every command acts on unless given --account


def _default(value: Any) -> Any:
    # the same shapes as the API's encoder (api/http.py): ISO 8601 times, ids as strings
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps(payload: Any) -> str:
    """One line of JSON, non-ASCII kept as it is."""
    return json.dumps(payload, default=_default, ensure_ascii=False)


def emit(payload: Any) -> None:
    """Print one JSON value."""
    print(dumps(payload))


def wants_json(forced: bool) -> bool:
    """JSON when asked for, or when stdout is not a terminal (a pipe, a file, a script)."""
    return forced or not sys.stdout.isatty()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    if isinstance(value, dict):
        return dumps(value) if value else ""
    return str(value).replace("\n", " ")


def listing(rows: Iterable[dict[str, Any]], columns: Sequence[str], *, as_json: bool) -> int:
    """Print rows as a JSON array (one object a line) or an aligned table; return the count."""
    n = 0
    if as_json:
        for row in rows:
            sys.stdout.write(("[" if n == 0 else ",\n ") + dumps(row))
            n += 1
        sys.stdout.write("[]\n" if n == 0 else "]\n")
        return n
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return len(cells)


def actor(name: str | None = None) -> dict[str, Any]:
    """Who runs this command, for audit logs and contact_events: --actor, else the OS user."""
    user = name or os.environ.get("PGCAST_ACTOR") or _os_user()
    return {"via": "cli", "user": user, "host": socket.gethostname()}


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return str(os.getuid())


def read_file(path: str) -> str:
    """A content file given on the command line (UTF-8); raises InvalidInput (exit 2)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.InvalidInput(f"cannot read {path}: {exc}") from None
