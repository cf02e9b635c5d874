"""Forms, topics and the archive: the checks and statements the CLI and the API share."""

from __future__ import annotations

import re
import urllib.parse
import uuid
from typing import Any

import psycopg

from pgcast.mail import errors as mail_errors
from pgcast.mail import validate
from pgcast.sql import errors, senders
from pgcast.sql.queries import QUERIES

MAX_URL = 2000  # characters of a form's redirect URL
MAX_LABEL = 200  # characters of a topic's label
SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _checked(check: Any, *args: Any) -> Any:
    try:
        return check(*args)
    except mail_errors.InvalidValue as exc:
        raise errors.InvalidInput(str(exc)) from None


def form_params(account: str, name: Any, tags: Any, from_address: Any, *,
                double_opt_in: bool = True, redirect_url: Any = None,
                embeddable: bool = False, allowed: list[str] | None = None) -> dict[str, Any]:
    """The statement parameters of a new form, every value checked; raises InvalidInput."""
    params = {"account": account, "name": _checked(validate.text_line, "name", name, 200),
              "tags": _checked(validate.tags, tags or []),
              "from_address": from_address, "double_opt_in": bool(double_opt_in),
              "redirect_url": None, "embeddable": bool(embeddable)}
    if not isinstance(from_address, str):
        raise errors.InvalidInput("from: give the From of the confirmation mails")
    _checked(validate.sender, from_address)
    reason = senders.refusal(from_address, allowed or [])
    if reason:
        raise errors.InvalidInput(reason)
    if redirect_url is not None:
        if not isinstance(redirect_url, str) or len(redirect_url) > MAX_URL:
            raise errors.InvalidInput(f"redirect: an http(s) URL of at most {MAX_URL} "
                                      "characters")
        parts = urllib.parse.urlsplit(redirect_url)
        if (parts.scheme not in ("http", "https") or not parts.netloc
                or any(c in redirect_url for c in " <>\"'\\\r\n\t")):
            raise errors.InvalidInput("redirect: must be an http(s) URL")
        params["redirect_url"] = redirect_url
    return params


def form_create(conn: psycopg.Connection[Any], params: dict[str, Any]) -> dict[str, Any]:
    """Insert a form; raises InvalidInput when the account has a form of that name."""
    row = conn.execute(QUERIES["form_create"], params).fetchone()
    if row is None:
        raise errors.InvalidInput(f"the account already has a form named {params['name']!r}")
    return dict(row)


def allowed_senders(conn: psycopg.Connection[Any], account: str) -> list[str]:
    """The senders an account may use (empty: any From)."""
    row = conn.execute(QUERIES["account_senders"], {"account": account}).fetchone()
    return list(row["senders"]) if row else []


def parse_form_id(raw: str) -> uuid.UUID:
    """A form id; raises NotFound for anything that is not one."""
    try:
        return uuid.UUID(str(raw))
    except ValueError:
        raise errors.NotFound("form not found") from None


def topic_params(account: str, tag: Any, label: Any) -> dict[str, Any]:
    """A topic's parameters, checked; raises InvalidInput."""
    (checked,) = _checked(validate.tags, [tag])
    return {"account": account, "tag": checked,
            "label": _checked(validate.text_line, "label", label, MAX_LABEL)}


def slug(value: Any) -> str:
    """An archive slug: lower-case letters, digits and dashes; raises InvalidInput."""
    if not isinstance(value, str) or not SLUG.fullmatch(value):
        raise errors.InvalidInput("slug: 1-63 lower-case letters, digits and dashes, "
                                  "starting with a letter or a digit")
    return value


def archive_enable(conn: psycopg.Connection[Any], account: str, value: str) -> dict[str, Any]:
    """Give an account its archive page; raises InvalidInput when another account has the slug."""
    try:
        with conn.transaction():
            row = conn.execute(QUERIES["archive_enable"],
                               {"account": account, "slug": slug(value)}).fetchone()
    except psycopg.errors.UniqueViolation:
        raise errors.InvalidInput(f"the slug {value!r} is taken") from None
    assert row is not None
    return dict(row)


def set_archive(conn: psycopg.Connection[Any], account: str, broadcast_id: Any,
                archive: bool) -> None:
    """List (or unlist) a broadcast on its account's archive page."""
    conn.execute(QUERIES["broadcast_set_archive"],
                 {"account": account, "id": broadcast_id, "archive": archive})
