"""Webhook endpoints: the checks the API, the CLI and the worker share (URL, address, events),
the signature, and the endpoint operations both the CLI and the API run.

No SSRF: a URL must be https (http only with PGCAST_WEBHOOKS_ALLOW_HTTP=1), and the address
a delivery connects to must be public (unless PGCAST_WEBHOOKS_ALLOW_PRIVATE=1): never
loopback, private, link-local, multicast, unspecified, reserved or a cloud metadata address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import urllib.parse
from collections.abc import Sequence
from typing import Any

import psycopg

from pgcast.sql import errors
from pgcast.sql.queries import QUERIES

EVENT_TYPES = (
    "broadcast.sending", "broadcast.paused", "broadcast.sent", "broadcast.failed",
    "broadcast.cancelled", "contact.subscribed", "contact.unsubscribed", "contact.suppressed",
    "message.sent", "message.delivered", "message.bounced", "message.complained",
    "message.failed",
)
ALL = "*"
MAX_ENDPOINTS = 20  # per account: each one may hold a delivery slot
MAX_URL = 2048  # characters

# cloud metadata services reachable from an instance (besides 169.254.0.0/16, link-local)
METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192"))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() == "1"


def allow_http() -> bool:
    """PGCAST_WEBHOOKS_ALLOW_HTTP=1: plain http URLs are accepted (for a local receiver)."""
    return _flag("PGCAST_WEBHOOKS_ALLOW_HTTP")


def allow_private() -> bool:
    """PGCAST_WEBHOOKS_ALLOW_PRIVATE=1: private and loopback addresses are accepted."""
    return _flag("PGCAST_WEBHOOKS_ALLOW_PRIVATE")


def forbidden(address: str) -> str | None:
    """Why a delivery may not connect to this IP address, else None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip in METADATA:
        return f"{ip} is a cloud metadata address"
    if allow_private():
        return None
    for what, bad in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                      ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                      ("private", ip.is_private), ("reserved", ip.is_reserved),
                      ("not globally routable", not ip.is_global)):
        if bad:
            return f"{ip} is a {what} address" if what != "not globally routable" \
                else f"{ip} is not globally routable"
    return None


def _loopback_name(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def parse_url(url: str, *, names: bool = True) -> urllib.parse.SplitResult:
    """A webhook URL, checked (scheme, host, a literal address, and with `names` the name
    localhost); raises InvalidInput. A delivery checks the addresses a name resolves to."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise errors.InvalidInput(f"url must be a URL of at most {MAX_URL} characters")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise errors.InvalidInput("url holds spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise errors.InvalidInput(f"url is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http"):
        raise errors.InvalidInput("url must be https")
    if parts.scheme == "http" and not allow_http():
        raise errors.InvalidInput("url must be https (http only with "
                                  "PGCAST_WEBHOOKS_ALLOW_HTTP=1)")
    if not parts.hostname:
        raise errors.InvalidInput("url has no host")
    if parts.username is not None or parts.password is not None:
        raise errors.InvalidInput("url must not hold a user or password")
    if parts.fragment:
        raise errors.InvalidInput("url must not hold a fragment (#...)")
    if port == 0:
        raise errors.InvalidInput("url's port must be 1-65535")
    try:
        literal: str | None = str(ipaddress.ip_address(parts.hostname.split("%", 1)[0]))
    except ValueError:
        literal = None
    if literal is not None:
        why = forbidden(literal)
        if why:
            raise errors.InvalidInput(f"url's address is refused: {why}")
    elif names and _loopback_name(parts.hostname) and not allow_private():
        raise errors.InvalidInput("url's host is refused: localhost is a loopback name")
    return parts


def events(raw: Any) -> list[str]:
    """The event types an endpoint wants, deduplicated, in the order given; raises InvalidInput."""
    if not isinstance(raw, list) or not raw or not all(isinstance(e, str) for e in raw):
        raise errors.InvalidInput("events must be a non-empty list of event types")
    unknown = [e for e in raw if e != ALL and e not in EVENT_TYPES]
    if unknown:
        raise errors.InvalidInput(f"unknown event type {unknown[0]!r} (known: "
                                  f"{', '.join(EVENT_TYPES)}, or * for all)")
    return list(dict.fromkeys(raw))


def new_secret() -> str:
    """A signing secret: whsec_ and 32 random bytes in hex."""
    return "whsec_" + secrets.token_hex(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The Pgcast-Signature header's value for one delivery."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def add_params(account: str, url: str, wanted: Any, actor: dict[str, Any]) -> dict[str, Any]:
    """The parameters of hooks_add, checked (a new secret among them); raises InvalidInput."""
    parse_url(url)
    return {"account": account, "url": url, "events": events(wanted), "secret": new_secret(),
            "actor": json.dumps(actor), "max": MAX_ENDPOINTS}


def added(row: dict[str, Any] | None, params: dict[str, Any]) -> dict[str, Any]:
    """What hooks_add's answer means: the endpoint with its secret; raises InvalidInput."""
    if row is None:
        raise errors.InvalidInput(f"an account has at most {MAX_ENDPOINTS} webhook endpoints")
    return {**item(row), "secret": params["secret"]}


def add(conn: psycopg.Connection[Any], account: str, url: str, wanted: Sequence[str],
        actor: dict[str, Any]) -> dict[str, Any]:
    """Create an endpoint; the result holds its secret (shown once). Raises InvalidInput."""
    params = add_params(account, url, list(wanted), actor)
    row = conn.execute(QUERIES["hooks_add"], params).fetchone()
    return added(dict(row) if row is not None else None, params)


def item(row: dict[str, Any]) -> dict[str, Any]:
    """One endpoint or delivery as JSON-ready values."""
    return {k: (v.isoformat() if hasattr(v, "isoformat") else
                str(v) if k in ("id", "event_id") and not isinstance(v, int) else v)
            for k, v in row.items()}
