"""Contacts: validation shared by the CLI and the API, and the writes."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import email_validator
import psycopg

from sql import errors
from sql.queries import QUERIES

MAX_TAG_LENGTH = 100  # characters
MAX_NAME_LENGTH = 500  # characters


@dataclass
class Rejected:
    """One input row that was not imported, and why."""

    where: int  # line number (CSV) or item index (API)
    email: str
    reason: str


@dataclass
class Batch:
    """Validated contacts ready to upsert, and the rows rejected."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def normalize_email(raw: str) -> str:
    """A syntactically valid address, normalized; raises InvalidInput."""
    try:
        info = email_validator.validate_email(raw.strip(), check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        raise errors.InvalidInput(str(exc)) from None
    return str(info.normalized)


def validate_tags(tags: Any) -> list[str]:
    """A list of non-empty, unique, reasonably short tags; raises InvalidInput."""
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise errors.InvalidInput("tags must be a list of strings")
    out: list[str] = []
    for t in (t.strip() for t in tags):
        if not t:
            raise errors.InvalidInput("a tag is empty")
        if len(t) > MAX_TAG_LENGTH:
            raise errors.InvalidInput(f"tag longer than {MAX_TAG_LENGTH} characters")
        if t not in out:
            out.append(t)
    return out


def validate(items: list[tuple[int, Any, Any, Any]]) -> Batch:
    """Validate (where, email, name, tags) items; the last of duplicate addresses wins."""
    batch = Batch()
    by_key: dict[str, dict[str, Any]] = {}
    for where, email, name, tags in items:
        shown = email if isinstance(email, str) else repr(email)
        try:
            if not isinstance(email, str):
                raise errors.InvalidInput("email must be a string")
            address = normalize_email(email)
            if name is not None and not isinstance(name, str):
                raise errors.InvalidInput("name must be a string")
            if name and len(name) > MAX_NAME_LENGTH:
                raise errors.InvalidInput(f"name longer than {MAX_NAME_LENGTH} characters")
            clean_tags = validate_tags(tags if tags is not None else [])
        except errors.InvalidInput as exc:
            batch.rejected.append(Rejected(where, shown, str(exc)))
            continue
        by_key[address.lower()] = {"email": address, "name": (name or "").strip(),
                                   "tags": clean_tags}
    batch.rows = list(by_key.values())
    return batch


def read_csv(path: Path) -> list[tuple[int, Any, Any, Any]]:
    """Rows of a CSV with header email,name,tags (tags separated by ';'); raises InvalidInput."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise errors.InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if "email" not in header:
            raise errors.InvalidInput(f"{path}: the header must name an 'email' column")
        reader.fieldnames = header
        items = []
        try:
            for row in reader:
                tags_text = (row.get("tags") or "").strip()
                tags = [t for t in (s.strip() for s in tags_text.split(";")) if t]
                items.append((reader.line_num, row.get("email") or "", row.get("name"), tags))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise errors.InvalidInput(f"{path}: line {reader.line_num}: {exc}") from None
    return items


def upsert(conn: psycopg.Connection[Any], account: str, rows: list[dict[str, Any]]) -> int:
    """Upsert validated rows (in chunks); return how many were written."""
    written = 0
    for start in range(0, len(rows), 10_000):
        chunk = rows[start : start + 10_000]
        cur = conn.execute(QUERIES["contacts_upsert"],
                           {"account": account, "rows": json.dumps(chunk)})
        written += cur.rowcount
    return written


def unsubscribe(conn: psycopg.Connection[Any], account: str, email: str) -> dict[str, Any]:
    """Unsubscribe one contact; raises NotFound."""
    row = conn.execute(QUERIES["contact_unsubscribe"],
                       {"account": account, "email": email}).fetchone()
    if row is None:
        raise errors.NotFound(f"no contact {email} in account {account}")
    return dict(row)
