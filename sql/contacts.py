"""Contacts: validation shared by the CLI and the API, and the writes."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pgcast.mail import errors as mail_errors
from pgcast.mail import validate as validate_mail
from pgcast.sql import errors
from pgcast.sql.queries import QUERIES

CHUNK = 10_000  # contacts per upsert statement
SUPPRESSED_REASONS = ("bounce", "soft_bounce", "complaint")


@dataclass
class Rejected:
    """One input row that was not imported, and why."""

    where: int  # line number (CSV) or item index (API)
    email: str
    reason: str


@dataclass
class Normalised:
    """An address stored differently from how it was given."""

    where: int
    given: str
    stored: str


@dataclass
class Batch:
    """Validated contacts ready to upsert, and the rows rejected, merged and normalised."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    merged: int = 0  # rows folded into an earlier row of the same address
    normalised: list[Normalised] = field(default_factory=list)
    # rows whose address a later row of the same address spells otherwise (case): that
    # later spelling is what is stored; `where` is the earlier row, `stored` the spelling kept
    respelled: list[Normalised] = field(default_factory=list)


@dataclass
class Written:
    """What an upsert did."""

    inserted: int = 0
    updated: int = 0
    erased: list[dict[str, Any]] = field(default_factory=list)  # rows left out: erased


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


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    # what the upsert does to a stored contact, done to an earlier row of the same file
    out = dict(old)
    out["email"] = new["email"]
    out["where"] = new["where"]
    if new.get("name"):
        out["name"] = new["name"]
    if new.get("tags"):
        out["tags"] = new["tags"]
    if "attributes" in old or "attributes" in new:
        out["attributes"] = {**old.get("attributes", {}), **new.get("attributes", {})}
    for key in ("unsubscribed_at", "suppressed_reason"):
        if old.get(key) or new.get(key):
            out[key] = old.get(key) or new.get(key)
    return out


def validate(items: list[tuple[Any, ...]], *, replace: bool = False) -> Batch:
    """Validate (where, email, name, tags[, attributes[, status]]) items into a Batch.

    Every check is bounded before it looks at a value (mail.validate), and a name, tag or
    address that could become header syntax is refused with the reason. Duplicates of one
    address merge the way the upsert merges into a stored contact (with `replace`, the last
    wins); `status` may carry unsubscribed_at and suppressed_reason.
    """
    batch = Batch()
    by_key: dict[str, dict[str, Any]] = {}
    for item in items:
        where, email, name, tags = item[:4]
        attributes = item[4] if len(item) > 4 else None
        status: dict[str, Any] = item[5] if len(item) > 5 else {}
        shown = email[:300] if isinstance(email, str) else repr(email)[:300]
        try:
            address = validate_mail.address(email)
            row: dict[str, Any] = {"where": where, "email": address,
                                   "name": validate_mail.name(name),
                                   "tags": validate_mail.tags(tags)}
            if attributes is not None:
                row["attributes"] = validate_mail.attributes(attributes)
        except mail_errors.InvalidValue as exc:
            batch.rejected.append(Rejected(where, shown, str(exc)))
            continue
        row.update(status)
        if isinstance(email, str) and address != email.strip():
            batch.normalised.append(Normalised(where, email.strip(), address))
        key = address.lower()
        if key in by_key:
            batch.merged += 1
            if by_key[key]["email"] != address:
                batch.respelled.append(Normalised(by_key[key]["where"], by_key[key]["email"],
                                                  address))
            row = row if replace else _merge(by_key[key], row)
        by_key[key] = row
    batch.rows = list(by_key.values())
    return batch


def read_csv(path: Path, encoding: str = "utf-8",
             named: tuple[str, str] | None = None) -> list[tuple[Any, ...]]:
    """The importable items of a contacts CSV (rows refused while reading are dropped;
    `named`: how the caller gives the encoding, for its errors)."""
    from pgcast.sql import contacts_csv  # it builds on this module

    return contacts_csv.read(path, encoding, named or contacts_csv.CLI_ENCODING)[0]


def upsert(conn: psycopg.Connection[Any], account: str, rows: list[dict[str, Any]], *,
           replace: bool = False, chunk_size: int = CHUNK) -> Written:
    """Upsert validated rows in one transaction (in chunks); erased addresses are left out."""
    done = Written()
    with conn.transaction():
        if len(rows) > chunk_size:
            # lock order: every existing contact, in id order, before a chunk's fence trigger
            conn.execute(QUERIES["contacts_lock"], {
                "account": account, "keys": [r["email"].lower() for r in rows]})
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            cur = conn.execute(QUERIES["contacts_upsert"], {
                "account": account, "rows": json.dumps(chunk), "replace": replace})
            written = {r["email"].lower(): r["inserted"] for r in cur.fetchall()}
            done.inserted += sum(1 for v in written.values() if v)
            done.updated += sum(1 for v in written.values() if not v)
            done.erased += [row for row in chunk if row["email"].lower() not in written]
    return done


ERASED_REASON = "erased at the person's request (contacts erase): not imported"


def unsubscribe(conn: psycopg.Connection[Any], account: str, email: str, *,
                source: str = "cli", actor: dict[str, Any] | None = None) -> dict[str, Any]:
    """Unsubscribe one contact, recorded in contact_events (source, actor); raises
    NotFound."""
    row = conn.execute(QUERIES["contact_unsubscribe"], {
        "account": account, "email": email, "source": source,
        "actor": json.dumps(actor or {})}).fetchone()
    if row is None:
        raise errors.NotFound(f"no contact {email} in account {account}")
    return dict(row)


# -- what an operator reads and does: list, count, resubscribe, erase ----------------------

STATUSES = ("subscribed", "unsubscribed", "suppressed", "unconfirmed")


def page(conn: psycopg.Connection[Any], account: str, *, tag: str | None = None,
         status: str | None = None, after: str = "", limit: int = 100) -> list[dict[str, Any]]:
    """One keyset page of an account's contacts by address, after `after` (lower-cased)."""
    if status is not None and status not in STATUSES:
        raise errors.InvalidInput(f"status must be one of {', '.join(STATUSES)}")
    rows = conn.execute(QUERIES["contacts_page"], {
        "account": account, "tag": tag, "status": status, "after": after.lower(),
        "limit": limit})
    return [dict(r) for r in rows]


def attribute_keys(conn: psycopg.Connection[Any], account: str) -> list[str]:
    """Every attribute name the account's contacts use, sorted."""
    return [r["key"] for r in conn.execute(QUERIES["contacts_attribute_keys"],
                                           {"account": account})]


def status_of(row: dict[str, Any]) -> str:
    """subscribed, unsubscribed, suppressed or unconfirmed (the harder stop shown first)."""
    if row.get("suppressed_at") is not None:
        return "suppressed"
    if row.get("unsubscribed_at") is not None:
        return "unsubscribed"
    # a row read before 0019 has no confirmed_at key: confirmed
    return "unconfirmed" if "confirmed_at" in row and row["confirmed_at"] is None else "subscribed"


def count(conn: psycopg.Connection[Any], account: str, tag: str | None = None) -> dict[str, Any]:
    """How many contacts, and how many are subscribed (mailable), unconfirmed, unsubscribed,
    suppressed."""
    row = conn.execute(QUERIES["contacts_count"], {"account": account, "tag": tag}).fetchone()
    assert row is not None
    return dict(row)


def resubscribe(conn: psycopg.Connection[Any], account: str, email: str, *, source: str,
                actor: dict[str, Any]) -> dict[str, Any]:
    """Clear a contact's unsubscribe, recorded in contact_events; raises NotFound."""
    row = conn.execute(QUERIES["contact_resubscribe"], {
        "account": account, "email": str(email).strip(), "source": source,
        "actor": json.dumps(actor, ensure_ascii=False)}).fetchone()
    if row is None:
        raise errors.NotFound(f"no contact {email} in account {account}")
    return dict(row)


def erase(conn: psycopg.Connection[Any], account: str, email: str, *, source: str,
          actor: dict[str, Any]) -> dict[str, Any]:
    """Erase an address's data, keeping the hash that refuses its re-import."""
    if not isinstance(email, str) or not email.strip() or len(email) > 1000:
        raise errors.InvalidInput("email: give the address to erase")
    # stored addresses are normalized; one that never validated is erased as given
    with contextlib.suppress(mail_errors.InvalidValue):
        email = validate_mail.address(email)
    row = conn.execute(QUERIES["contact_erase"], {
        "account": account, "email": email.strip(), "source": source,
        "actor": json.dumps(actor, ensure_ascii=False)}).fetchone()
    assert row is not None
    return dict(row)
