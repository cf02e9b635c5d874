"""Opaque, per-account page cursors: a sealed position that only this API can open.

A recipient page is keyed by contacts.id, a global sequence: shown as is, it would tell one
tenant how many contacts every tenant holds. The position is sealed with AES-GCM under the
API's cursor key, bound (as associated data) to the account and the broadcast, so a cursor
reveals nothing and is refused anywhere but where it was issued.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct

from cryptography import exceptions as crypto_errors
from cryptography.hazmat.primitives.ciphers import aead

from pgcast.api import errors

NONCE_BYTES = 12  # AES-GCM's standard nonce; random per cursor
INVALID = "cursor is not a cursor this API returned for this list"
MAX_CURSOR_LENGTH = 200  # characters: refused before any decoding


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def seal(key: bytes, scope: str, position: int) -> str:
    """A cursor for `position` (a signed 64-bit key) in the list named by `scope`."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = aead.AESGCM(key).encrypt(nonce, struct.pack(">q", position), scope.encode())
    return _b64(nonce + sealed)


def open_(key: bytes, scope: str, cursor: str) -> int:
    """The position sealed in `cursor` for this scope; raises InvalidBody (generic text)."""
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise errors.InvalidBody(INVALID)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        plain = aead.AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], scope.encode())
        position: int = struct.unpack(">q", plain)[0]
    except (ValueError, binascii.Error, crypto_errors.InvalidTag, struct.error):
        raise errors.InvalidBody(INVALID) from None
    return position
