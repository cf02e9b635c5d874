"""One-click unsubscribe (RFC 8058): GET /u/{token} shows a page, POST unsubscribes.

A broadcast's token names its contact; a marketing message's names the message, whose
account and address name the contact (mail.unsubscribe). No JWT, no cookie, no redirect.
GET never unsubscribes (mail scanners prefetch links); the page's one button POSTs the same
body a mail client sends for one click. A malformed or forged token answers 400 with a page
that says nothing about any contact.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import os
import urllib.parse

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from pgcast.api import context, db, errors, http
from pgcast.mail import unsubscribe

MAX_FORM = 1024  # bytes of a one-click POST body we read
ONE_CLICK = ("List-Unsubscribe", "One-Click")  # RFC 8058's form field and value

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;"
          "padding:0 1rem}\nbutton{font-size:1rem;padding:.6rem 1.2rem}")
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>""" + _STYLE.replace("{", "{{").replace("}", "}}") + """</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""
# Nothing runs, nothing loads, nobody frames the page (clickjacking the one button); the one
# style block is allowed by its hash, the one form posts back to this origin.
CSP = ("default-src 'none'; "
       f"style-src 'sha256-{base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()}'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
CONFIRM = _PAGE.format(
    title="Unsubscribe",
    body="<p>Stop receiving these emails?</p>"
         '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
         '<button type="submit">Unsubscribe</button></form>')
DONE = _PAGE.format(title="You are unsubscribed",
                    body="<p>You will not receive these emails any more.</p>")
TEST_DONE = _PAGE.format(title="Test message",
                         body="<p>This link came from a test send: nobody was unsubscribed.</p>")
INVALID = _PAGE.format(title="Invalid link",
                       body="<p>This unsubscribe link is not valid. Use the link from the "
                            "email, whole.</p>")
BAD_FORM = _PAGE.format(title="Unsubscribe",
                        body="<p>The request was not a one-click unsubscribe.</p>")


def is_one_click(content_type: str, body: bytes) -> bool:
    """Whether a POST body is `List-Unsubscribe=One-Click`, urlencoded or multipart/form-data.

    RFC 8058 asks mail clients for multipart/form-data and allows urlencoded: take both.
    """
    if content_type.lower().startswith("multipart/form-data"):
        head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
        parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        if not parsed.is_multipart():
            return False
        for part in parsed.iter_parts():
            name = part.get_param("name", header="content-disposition")
            value = part.get_payload(decode=True)
            if (name == ONE_CLICK[0] and isinstance(value, bytes)
                    and value.strip() == ONE_CLICK[1].encode()):
                return True
        return False
    return ONE_CLICK in urllib.parse.parse_qsl(body.decode("latin-1"))


def _html(page: str, status: int = 200) -> Response:
    return HTMLResponse(page, status_code=status,
                        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                                 "Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
                                 "X-Content-Type-Options": "nosniff"})


async def keys(request: Request) -> unsubscribe.Keys:
    """The keys in force: PGCAST_UNSUBSCRIBE_SECRET, else the database's generated key."""
    cached: unsubscribe.Keys | None = getattr(request.app.state, "unsubscribe_keys", None)
    if cached is not None:
        return cached
    secret = os.environ.get("PGCAST_UNSUBSCRIBE_SECRET")
    stored = None
    if not (secret and secret.strip()):
        row = await db.one(context.pool(request), "unsubscribe_key", {})
        stored = row["secret"] if row else None
    found = unsubscribe.keys_from(secret, stored)
    request.app.state.unsubscribe_keys = found
    return found


async def _target(request: Request) -> unsubscribe.Target | None:
    try:
        return (await keys(request)).read(str(request.path_params.get("token", "")),
                                          messages=True)
    except unsubscribe.InvalidToken:
        return None


async def page(request: Request) -> Response:
    """GET /u/{token}: the confirm page (never unsubscribes)."""
    if await _target(request) is None:
        return _html(INVALID, 400)
    return _html(CONFIRM)


async def one_click(request: Request) -> Response:
    """POST /u/{token} with `List-Unsubscribe=One-Click`: unsubscribe; idempotent, 200."""
    target = await _target(request)
    if target is None:
        return _html(INVALID, 400)
    try:
        body = await http.read_body(request, MAX_FORM)
    except (errors.BodyTooLarge, errors.MalformedJson):
        return _html(BAD_FORM, 400)
    if not is_one_click(request.headers.get("content-type", ""), body):
        return _html(BAD_FORM, 400)
    if target.test:
        return _html(TEST_DONE)
    if target.message_id is not None:  # a marketing message's link
        await db.one(context.pool(request), "message_one_click_unsubscribe",
                     {"id": target.message_id})
        return _html(DONE)
    await db.one(context.pool(request), "one_click_unsubscribe", {
        "contact_id": target.contact_id, "account_prefix": target.account_prefix,
        "broadcast_id": target.broadcast_id})
    return _html(DONE)


def configured_url() -> str:
    """PGCAST_PUBLIC_URL (or the local default); raises InvalidValue."""
    return unsubscribe.public_url(os.environ.get("PGCAST_PUBLIC_URL"))

