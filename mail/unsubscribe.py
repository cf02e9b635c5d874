"""One-click unsubscribe tokens: opaque, authenticated, never expiring (AES-256-GCM).

A token names the contact and the broadcast to pgcast alone: they are encrypted, so a
reader learns neither, and the GCM tag refuses any altered or forged token. A marketing
message's token (kind 2) names the message instead, sealed the same way: the message's
account and address name the contact, so it cannot reach another account's. Version 2 carries
no account name: the contact id is the contacts table's own key, so the link is the same
length and just as exact for every account name. Version 1 links (sent before issue 23)
carried the account cut to 200 bytes; they are still read, and match the contact by that
prefix. Keys come from PGCAST_UNSUBSCRIBE_SECRET (comma-separated: the first makes tokens,
every one is accepted, so keys rotate) or from the key the database generated once.
"""

from __future__ import annotations

import base64
import binascii
import functools
import itertools
import os
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pgcast.mail import errors

MIN_SECRET = 32  # bytes a secret must have
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8080"  # file and null providers without a setting
VERSION = 2  # what make() writes
VERSION_CUT_ACCOUNT = 1  # read only: the account's first MAX_ACCOUNT bytes follow the head
KIND_REAL = 0  # unsubscribes the contact
KIND_TEST = 1  # a test send's link: shows the page, unsubscribes nobody
KIND_MESSAGE = 2  # a marketing message's link: the id is the message's, the contact id 0
MAX_ACCOUNT = 200  # bytes of account name a version 1 token carried (cut, maybe mid-character)
MAX_TOKEN = 400  # characters of a token we try to read
_NONCE = 12  # bytes
_TAG = 16  # bytes: AES-GCM's tag
_AAD = b"pgcast one-click unsubscribe"
_HEAD = struct.Struct(">BB16sq")  # version, kind, broadcast id, contact id; then the account


class InvalidToken(errors.MailError):
    """A token that is malformed, altered, forged or made with a key we no longer have."""


@dataclass(frozen=True)
class Target:
    """What a token names."""

    contact_id: int
    broadcast_id: uuid.UUID
    test: bool
    # a version 1 token's account bytes (at most MAX_ACCOUNT, maybe cut); None in version 2
    account_prefix: bytes | None = None
    # a marketing message's token (kind 2): the message; contact_id is then 0 and
    # broadcast_id the nil UUID (the message's address names the contact)
    message_id: uuid.UUID | None = None


@functools.lru_cache(maxsize=16)
def _aead(secret: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"pgcast unsubscribe token v1").derive(secret.encode())
    return AESGCM(key)


def parse_secrets(raw: str) -> tuple[str, ...]:
    """PGCAST_UNSUBSCRIBE_SECRET's keys, each at least MIN_SECRET bytes; raises InvalidValue."""
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    if not keys:
        raise errors.InvalidValue("PGCAST_UNSUBSCRIBE_SECRET", "is empty")
    if any(len(k.encode()) < MIN_SECRET for k in keys):
        raise errors.InvalidValue("PGCAST_UNSUBSCRIBE_SECRET",
                                  f"every key must be at least {MIN_SECRET} bytes")
    return keys


@dataclass(frozen=True)
class Keys:
    """The keys in force: the first makes tokens, all read them."""

    secrets: tuple[str, ...]

    def make(self, account: str, contact_id: int, broadcast_id: str | uuid.UUID,
             test: bool = False) -> str:
        """A token for one contact of one broadcast (the account is not carried: see above)."""
        return self.maker(account, broadcast_id, test)(contact_id)

    def maker(self, account: str, broadcast_id: str | uuid.UUID,
              test: bool = False) -> Callable[[int], str]:
        """Tokens for the contacts of one broadcast (what they share is packed once)."""
        del account  # the contact id names the contact in every account
        head, seal = self._sealer(broadcast_id, test)
        contact = struct.Struct(">q").pack

        def make(contact_id: int) -> str:
            nonce = os.urandom(_NONCE)
            sealed = seal(nonce, head + contact(contact_id), _AAD)
            return base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()

        return make

    def many_maker(self, account: str, broadcast_id: str | uuid.UUID,
                   test: bool = False) -> Callable[[Sequence[int]], list[str]]:
        """Tokens for a group of contacts at once, each what maker() makes for it: one
        os.urandom call for the group's nonces and one base64 pass over its tokens (a
        token's 54 bytes are 72 characters with no padding, so the tokens' text is the
        text of their bytes joined; issue 32: a third of a token's cost)."""
        head, seal = self._sealer(broadcast_id, test)
        contact = struct.Struct(">q").pack
        one = self.maker(account, broadcast_id, test)
        size = _NONCE + len(head) + 8 + _TAG  # bytes of one token
        if size % 3:  # not whole base64 quanta: one at a time
            return lambda contact_ids: [one(cid) for cid in contact_ids]
        chars = size // 3 * 4

        def make(contact_ids: Sequence[int]) -> list[str]:
            n = len(contact_ids)
            randoms = os.urandom(_NONCE * n)
            nonces = [randoms[at:at + _NONCE] for at in range(0, _NONCE * n, _NONCE)]
            sealed = map(seal, nonces, [head + contact(cid) for cid in contact_ids],
                         itertools.repeat(_AAD, n))
            raw = b"".join(itertools.chain.from_iterable(zip(nonces, sealed, strict=True)))
            text = base64.urlsafe_b64encode(raw).decode()
            return [text[at:at + chars] for at in range(0, len(text), chars)]

        return make

    def _sealer(self, broadcast_id: str | uuid.UUID,
                test: bool) -> tuple[bytes, Callable[[bytes, bytes, bytes], bytes]]:
        """What a broadcast's tokens share before the contact id (version, kind, broadcast
        id), and the first key's AES-GCM encrypt(nonce, plaintext, aad)."""
        bid = broadcast_id if isinstance(broadcast_id, uuid.UUID) else uuid.UUID(broadcast_id)
        head = struct.Struct(">BB16s").pack(VERSION, KIND_TEST if test else KIND_REAL,
                                            bid.bytes)
        return head, _aead(self.secrets[0]).encrypt

    def message(self, message_id: str | uuid.UUID) -> str:
        """The token of a marketing message's one-click unsubscribe (version 2, kind 2)."""
        mid = message_id if isinstance(message_id, uuid.UUID) else uuid.UUID(str(message_id))
        nonce = os.urandom(_NONCE)
        sealed = _aead(self.secrets[0]).encrypt(
            nonce, _HEAD.pack(VERSION, KIND_MESSAGE, mid.bytes, 0), _AAD)
        return base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()

    def read(self, token: str, messages: bool = False) -> Target:
        """What a token names; raises InvalidToken. A message's token is read only with
        `messages` (the one-click route): every other page a token opens is a broadcast's."""
        if not token or len(token) > MAX_TOKEN or not token.isascii():
            raise InvalidToken("malformed")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise InvalidToken("malformed") from None
        nonce, sealed = raw[:_NONCE], raw[_NONCE:]
        if len(nonce) != _NONCE or len(sealed) < 16 + _HEAD.size:
            raise InvalidToken("malformed")
        for secret in self.secrets:
            try:
                plain = _aead(secret).decrypt(nonce, sealed, _AAD)
            except InvalidTag:
                continue
            version, kind, bid, contact_id = _HEAD.unpack_from(plain)
            tail = plain[_HEAD.size:]
            if kind == KIND_MESSAGE:
                if not messages or version != VERSION or tail or contact_id != 0:
                    break
                return Target(0, uuid.UUID(int=0), False, None, uuid.UUID(bytes=bid))
            if kind not in (KIND_REAL, KIND_TEST):
                break
            if version == VERSION and not tail:
                prefix = None
            elif version == VERSION_CUT_ACCOUNT and 0 < len(tail) <= MAX_ACCOUNT:
                prefix = tail  # maybe cut inside a character: compared as bytes
            else:
                break
            return Target(contact_id, uuid.UUID(bytes=bid), kind == KIND_TEST, prefix)
        raise InvalidToken("not a token we made")


def keys_from(env_secret: str | None, database_secret: str | None) -> Keys:
    """The setting when given, else the database's generated key; raises InvalidValue."""
    if env_secret and env_secret.strip():
        return Keys(parse_secrets(env_secret))
    if not database_secret:
        raise errors.InvalidValue("PGCAST_UNSUBSCRIBE_SECRET",
                                  "is not set and the database has no generated key "
                                  "(run `pgcast migrate`)")
    return Keys((database_secret,))


def public_url(env_url: str | None) -> str:
    """PGCAST_PUBLIC_URL without a trailing slash, or the local default."""
    url = (env_url or "").strip().rstrip("/")
    if not url:
        return DEFAULT_PUBLIC_URL
    if not url.startswith(("https://", "http://")) or any(c in url for c in " <>\"\r\n"):
        raise errors.InvalidValue("PGCAST_PUBLIC_URL", "must be an http(s) URL")
    return url


def link(base_url: str, token: str) -> str:
    """The unsubscribe URL of a token."""
    return f"{base_url}/u/{token}"
