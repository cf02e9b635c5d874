"""Sign-up confirmation links: opaque, authenticated, expiring after 7 days (AES-256-GCM).

The keys are the unsubscribe keys (PGCAST_UNSUBSCRIBE_SECRET, comma-separated and rotating,
or the database's generated key: mail.unsubscribe.Keys); a key of its own is derived from
each, so a confirmation token is never read as an unsubscribe token or the other way round.
A token names the address, the form and the time it was made (the address, not a contact id:
the mail is composed before the sign-up's one statement runs); a reader learns none of them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import struct
import time
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pgcast.mail import unsubscribe

LIFETIME = 7 * 24 * 3600  # seconds a confirmation link works
VERSION = 1
MAX_TOKEN = 2000  # characters of a token we try to read (an address is at most 254)
_NONCE = 12  # bytes
_AAD = b"pgcast sign-up confirmation"
_HEAD = struct.Struct(">B16sq")  # version, form id, issued (unix seconds); then the address


class Expired(unsubscribe.InvalidToken):
    """A genuine confirmation token older than LIFETIME."""


@dataclass(frozen=True)
class Confirmation:
    """What a confirmation token names."""

    email: str
    form_id: uuid.UUID
    issued: float  # unix seconds


@functools.lru_cache(maxsize=16)
def _aead(secret: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"pgcast confirmation token v1").derive(secret.encode())
    return AESGCM(key)


def make(keys: unsubscribe.Keys, email: str, form_id: uuid.UUID,
         now: float | None = None) -> str:
    """A token for one sign-up, made with the first key."""
    issued = int(time.time() if now is None else now)
    nonce = os.urandom(_NONCE)
    sealed = _aead(keys.secrets[0]).encrypt(
        nonce, _HEAD.pack(VERSION, form_id.bytes, issued) + email.encode(), _AAD)
    return base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()


def read(keys: unsubscribe.Keys, token: str, now: float | None = None) -> Confirmation:
    """What a token names; raises InvalidToken, or Expired after LIFETIME."""
    if not token or len(token) > MAX_TOKEN or not token.isascii():
        raise unsubscribe.InvalidToken("malformed")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise unsubscribe.InvalidToken("malformed") from None
    nonce, sealed = raw[:_NONCE], raw[_NONCE:]
    if len(nonce) != _NONCE or len(sealed) <= 16 + _HEAD.size:
        raise unsubscribe.InvalidToken("malformed")
    for secret in keys.secrets:
        try:
            plain = _aead(secret).decrypt(nonce, sealed, _AAD)
        except InvalidTag:
            continue
        version, form, issued = _HEAD.unpack_from(plain)
        try:
            email = plain[_HEAD.size:].decode()
        except UnicodeDecodeError:
            break
        if version != VERSION:
            break
        age = (time.time() if now is None else now) - issued
        if age > LIFETIME:
            raise Expired("the link is older than 7 days")
        return Confirmation(email, uuid.UUID(bytes=form), float(issued))
    raise unsubscribe.InvalidToken("not a token we made")


def link(base_url: str, token: str) -> str:
    """The confirmation URL of a token."""
    return f"{base_url}/f/confirm/{token}"


SUBJECT = "Confirm your subscription"


def message(url: str) -> tuple[str, str, str]:
    """(subject, text, html) of a confirmation mail: plain, no tracking, the link shown whole."""
    text = ("Please confirm that you want to receive our emails:\n\n"
            f"{url}\n\n"
            "The link works for 7 days. If you did not ask for this, ignore this email: "
            "you will not hear from us again.\n")
    safe = url.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    html = ("<!doctype html><html><body>"
            "<p>Please confirm that you want to receive our emails:</p>"
            f'<p><a href="{safe}">Confirm my subscription</a></p>'
            f"<p>{safe}</p>"
            "<p>The link works for 7 days. If you did not ask for this, ignore this email: "
            "you will not hear from us again.</p></body></html>")
    return SUBJECT, text, html

