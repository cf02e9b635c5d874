"""Reading a contacts CSV: file-level problems raise, row-level ones are reported per line."""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import io
from pathlib import Path
from typing import Any

from pgcast.sql import contacts, errors

# Columns with a meaning of their own; every other column becomes a string attribute.
EMAIL, NAME, TAGS = "email", "name", "tags"
UNSUBSCRIBED_AT, SUPPRESSED_REASON = "unsubscribed_at", "suppressed_reason"
RESERVED = (EMAIL, NAME, TAGS, UNSUBSCRIBED_AT, SUPPRESSED_REASON)


CLI_ENCODING = ("--encoding", "--encoding latin-1")  # how the caller names the encoding


def _decode(path: Path, encoding: str, named: tuple[str, str]) -> str:
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise errors.InvalidInput(f"{named[0]}: unknown encoding {encoding!r}") from None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise errors.InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    try:
        # a UTF-8 byte order mark (Excel writes one) is not part of the header
        return data.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise errors.InvalidInput(
            f"{path}: line {line}: not valid {codec} (byte 0x{data[exc.start]:02x}); nothing "
            f"imported; give the file's encoding, e.g. {named[1]}") from None


def _header(path: Path, names: list[str]) -> list[str]:
    header = [h.strip() for h in names]
    lowered = [h.lower() if h.lower() in RESERVED else h for h in header]
    if EMAIL not in lowered:
        raise errors.InvalidInput(f"{path}: the header must name an 'email' column")
    if any(not h for h in lowered):
        raise errors.InvalidInput(f"{path}: line 1: a header column has no name")
    seen: set[str] = set()
    for h in lowered:
        if h.lower() in seen:
            raise errors.InvalidInput(f"{path}: line 1: column {h!r} appears twice")
        seen.add(h.lower())
    return lowered


def _status(cells: dict[str, str]) -> dict[str, Any]:
    """unsubscribed_at and suppressed_reason cells (an export's); raises ValueError."""
    out: dict[str, Any] = {}
    raw = cells.get(UNSUBSCRIBED_AT, "").strip()
    if raw:
        when = dt.datetime.fromisoformat(raw)
        if when.tzinfo is None:
            raise ValueError(f"{UNSUBSCRIBED_AT}: give a time zone, as 2026-01-31T12:00:00+00:00")
        out[UNSUBSCRIBED_AT] = when.isoformat()
    reason = cells.get(SUPPRESSED_REASON, "").strip()
    if reason:
        if reason not in contacts.SUPPRESSED_REASONS:
            raise ValueError(f"{SUPPRESSED_REASON}: must be one of "
                             f"{', '.join(contacts.SUPPRESSED_REASONS)}")
        out[SUPPRESSED_REASON] = reason
    return out


def read(path: Path, encoding: str = "utf-8", named: tuple[str, str] = CLI_ENCODING
         ) -> tuple[list[tuple[Any, ...]], list[contacts.Rejected]]:
    """Items for contacts.validate, and the rows refused before validation.

    The header names the columns: email (required), name, tags (separated by ';'),
    unsubscribed_at and suppressed_reason (as `contacts export` writes them); every other
    column is a string attribute. An empty cell gives nothing (the stored value stays).
    A problem with the file as a whole (encoding, quoting, header) raises InvalidInput
    before anything is written; `named`: how the caller gives the encoding, for its errors.
    """
    text = _decode(path, encoding, named)
    # strict: a quote left open or text after a closing quote is a broken file, not a row
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    items: list[tuple[Any, ...]] = []
    rejected: list[contacts.Rejected] = []
    try:
        first = next(reader, None)
        if first is None:
            raise errors.InvalidInput(f"{path}: the file is empty")
        header = _header(path, first)
        end = reader.line_num
        for cells in reader:
            line, end = end + 1, reader.line_num  # a quoted field may span lines
            if not any(c.strip() for c in cells):
                continue  # a blank line
            if len(cells) > len(header):
                rejected.append(contacts.Rejected(
                    line, cells[header.index(EMAIL)][:300] if len(cells) > 0 else "",
                    f"{len(cells)} fields, the header has {len(header)}"))
                continue
            # cells go to the validators as given: they refuse control characters first
            row = dict(zip(header, cells, strict=False))
            email = row.get(EMAIL, "")
            name = row.get(NAME) if (row.get(NAME) or "").strip() else None
            tags = [t for t in (s.strip() for s in row.get(TAGS, "").split(";")) if t]
            attributes = {h: v.strip() for h, v in row.items()
                          if h not in RESERVED and v.strip()}
            try:
                status = _status(row)
            except ValueError as exc:
                rejected.append(contacts.Rejected(line, email[:300], str(exc)))
                continue
            items.append((line, email, name, tags, attributes, status))
    except csv.Error as exc:
        raise errors.InvalidInput(f"{path}: line {reader.line_num}: {exc}; nothing imported"
                                  ) from None
    return items, rejected
