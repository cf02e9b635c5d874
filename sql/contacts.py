"""Contacts: validation shared by the CLI and the API, and the writes."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from mail import errors as mail_errors
from mail import validate as validate_mail
from sql import errors
from sql.queries import QUERIES


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


def normalize_email(raw: Any, field_name: str = "email") -> str:
    """A valid address, normalized (IDNA domain); raises InvalidInput."""
    try:
        return validate_mail.address(raw, field_name)
    except mail_errors.InvalidValue as exc:
        raise errors.InvalidInput(str(exc)) from None


def validate_tags(tags: Any) -> list[str]:
    """At most 100 non-empty, unique, reasonably short tags; raises InvalidInput."""
    try:
        return validate_mail.tags(tags)
    except mail_errors.InvalidValue as exc:
        raise errors.InvalidInput(str(exc)) from None


def validate(items: list[tuple[Any, ...]]) -> Batch:
    """Validate (where, email, name, tags[, attributes]) items; the last of duplicates wins.

    Every check is bounded before it looks at a value (mail.validate), and a name, tag or
    address that could become header syntax is refused with the reason.
    """
    batch = Batch()
    by_key: dict[str, dict[str, Any]] = {}
    for item in items:
        where, email, name, tags = item[:4]
        attributes = item[4] if len(item) > 4 else None
        shown = email[:300] if isinstance(email, str) else repr(email)[:300]
        try:
            address = validate_mail.address(email)
            row: dict[str, Any] = {"email": address, "name": validate_mail.name(name),
                                   "tags": validate_mail.tags(tags)}
            if attributes is not None:
                row["attributes"] = validate_mail.attributes(attributes)
        except mail_errors.InvalidValue as exc:
            batch.rejected.append(Rejected(where, shown, str(exc)))
            continue
        by_key[address.lower()] = row
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
