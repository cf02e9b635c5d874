"""Amazon SNS message verification: shape, age, certificate URL, the signature, then the topic.

Nothing about a message is said to its sender until its signature verifies (the route answers
one refusal for every reason; the reason goes to the log): the topic is checked after the
signature, so an unsigned message cannot probe which topics are allowed. Certificates are
fetched only from sns.<region>.amazonaws.com for a real AWS region, one fetch per URL at a
time, and a failed fetch is remembered for FAILURE_TTL seconds.
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime as dt
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import anyio.to_thread
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
# the fields each type's canonical string signs, in the order SNS documents
SIGNED = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token",
                                 "TopicArn", "Type"),
}
SIGNED["UnsubscribeConfirmation"] = SIGNED["SubscriptionConfirmation"]
OPTIONAL = frozenset({"Subject"})  # left out of the canonical string when absent
HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
# The AWS regions whose SNS endpoint is sns.<region>.amazonaws.com (the China regions use
# amazonaws.com.cn and are not served). A new region is one line here.
REGIONS = frozenset({
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "us-gov-east-1", "us-gov-west-1",
    "ca-central-1", "ca-west-1", "mx-central-1", "sa-east-1",
    "eu-central-1", "eu-central-2", "eu-west-1", "eu-west-2", "eu-west-3", "eu-south-1",
    "eu-south-2", "eu-north-1", "il-central-1", "me-south-1", "me-central-1", "af-south-1",
    "ap-east-1", "ap-east-2", "ap-south-1", "ap-south-2", "ap-southeast-1", "ap-southeast-2",
    "ap-southeast-3", "ap-southeast-4", "ap-southeast-5", "ap-southeast-7",
    "ap-northeast-1", "ap-northeast-2", "ap-northeast-3",
})
SNS_HOSTS = frozenset(f"sns.{region}.amazonaws.com" for region in REGIONS)
FAILURE_TTL = 60.0  # seconds a failed certificate fetch is remembered (not fetched again)
FAILURE_CACHE = 64  # failed URLs remembered at most
MAX_FETCHES = 4  # certificate fetches in flight at once, all URLs together (threads held)
MAX_JSON_DEPTH = 32  # nesting levels of an SNS message or its Message (SES events use ~6)
MAX_FUTURE = 300.0  # seconds: a timestamp further ahead than clock skew explains is refused
MAX_CERT_BYTES = 64 * 1024  # a PEM certificate is a few KB
MAX_FIELD = 300 * 1024  # characters: SNS messages are at most 256 KB
FETCH_TIMEOUT = 10.0  # seconds
CACHE_SIZE = 16  # certificates: SNS signs with one per region at a time

Fetch = Callable[[str], bytes]


class Refused(Exception):
    """A message that fails a check: refused with the reason, nothing fetched after it."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect could lead off the checked host


_OPENER = urllib.request.build_opener(_NoRedirect)


def https_get(url: str) -> bytes:
    """GET an https URL (already checked to be on an SNS host), bounded; no redirects."""
    try:
        with _OPENER.open(url, timeout=FETCH_TIMEOUT) as answer:
            body: bytes = answer.read(MAX_CERT_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the answer's socket (a redirect, an error status)
        raise
    if len(body) > MAX_CERT_BYTES:
        raise Refused(f"the answer of {url} is too large")
    return body


def sns_url(raw: Any, *, pem: bool) -> str:
    """An https URL on an SNS host (parsed, not matched as text); raises Refused."""
    if not isinstance(raw, str) or len(raw) > 2048:
        raise Refused("the URL must be a string")
    try:
        url = urllib.parse.urlsplit(raw)
        port = url.port
    except ValueError as exc:
        raise Refused(f"malformed URL: {exc}") from None
    if url.scheme != "https" or url.username is not None or url.password is not None:
        raise Refused("the URL must be https, without credentials")
    if port not in (None, 443) or (url.hostname or "") not in SNS_HOSTS:
        raise Refused(f"the URL is not on an SNS host: {url.hostname!r}")
    if pem and (not url.path.endswith(".pem") or url.query or url.fragment):
        raise Refused("the signing certificate URL must name a .pem file")
    return raw


def canonical(message: Mapping[str, Any]) -> bytes:
    """The string SNS signs for this message's type: `name\\nvalue\\n` per signed field."""
    parts: list[str] = []
    for name in SIGNED[message["Type"]]:
        if name in OPTIONAL and message.get(name) is None:  # absent or null: not signed
            continue
        parts.extend((name, message[name]))
    return ("\n".join(parts) + "\n").encode()


def _timestamp(raw: str) -> float:
    try:
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise Refused(f"malformed Timestamp: {raw[:40]!r}") from None
    if when.tzinfo is None:
        raise Refused("the Timestamp has no time zone")
    return when.timestamp()


class Verifier:
    """Checks SNS messages for the allowed topics; fetches certificates through `fetch`.

    `fetch` is the seam tests use to hand over their own certificate; production uses
    https_get. The certificate URL is fetched only for a message that passed every other
    check but the topic (see the module's docstring), and each certificate is fetched once
    (cached by URL).
    """

    def __init__(self, topics: frozenset[str], max_age: float, fetch: Fetch = https_get,
                 clock: Callable[[], float] = time.time, *, require_v2: bool = False,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.topics = topics
        self.max_age = max_age
        self.fetch = fetch
        self.clock = clock
        self.require_v2 = require_v2  # PGCAST_SNS_REQUIRE_V2: SHA1 signatures refused
        self.monotonic = monotonic
        self._keys: collections.OrderedDict[str, rsa.RSAPublicKey] = collections.OrderedDict()
        # url -> (until, the failure): a failed fetch is not tried again before `until`
        self._failed: collections.OrderedDict[str, tuple[float, Exception]] = (
            collections.OrderedDict())
        self._fetching: dict[str, threading.Lock] = {}  # one fetch per URL at a time
        self._fetches = threading.BoundedSemaphore(MAX_FETCHES)
        self._lock = threading.Lock()

    def check(self, message: Any) -> bytes:
        """Every check that needs no certificate (but the topic); returns the signature."""
        if not isinstance(message, dict):
            raise Refused("the body must be a JSON object")
        kind = message.get("Type")
        if kind not in TYPES:
            raise Refused(f"unknown Type {str(kind)[:40]!r}")
        for name in (*SIGNED[kind], "SignatureVersion", "Signature", "SigningCertURL"):
            value = message.get(name)
            if name in OPTIONAL and value is None:
                continue
            if not isinstance(value, str) or len(value) > MAX_FIELD:
                raise Refused(f"{name} is missing or not a string")
        if message["SignatureVersion"] not in HASHES:
            raise Refused(f"unknown SignatureVersion {message['SignatureVersion'][:10]!r}")
        if self.require_v2 and message["SignatureVersion"] != "2":
            raise Refused("SignatureVersion 1 (SHA1) is refused: PGCAST_SNS_REQUIRE_V2 is set")
        age = self.clock() - _timestamp(message["Timestamp"])
        if age > self.max_age:
            raise Refused(f"the message is {age:.0f} s old (PGCAST_SNS_MAX_AGE {self.max_age:.0f})")
        if age < -MAX_FUTURE:
            raise Refused("the Timestamp is in the future")
        sns_url(message["SigningCertURL"], pem=True)
        if kind == "SubscriptionConfirmation":
            sns_url(message["SubscribeURL"], pem=False)
        try:
            return base64.b64decode(message["Signature"], validate=True)
        except (binascii.Error, ValueError):
            raise Refused("the Signature is not base64") from None

    def key(self, url: str) -> rsa.RSAPublicKey:
        """The public key of the certificate at url: fetched once, a failure kept a minute."""
        with self._lock:
            cached = self._keys.get(url)
            if cached is not None:
                self._keys.move_to_end(url)
                return cached
            gate = self._fetching.setdefault(url, threading.Lock())
        with gate:  # a burst for one URL makes one fetch; the others read its outcome
            with self._lock:
                cached = self._keys.get(url)
                failed = self._failed.get(url)
            if cached is not None:
                return cached
            if failed is not None and failed[0] > self.monotonic():
                raise type(failed[1])(f"{failed[1]} (under {FAILURE_TTL:.0f} s ago)")
            try:
                public = self._load(url)
            except FetchesBusy:  # not this URL's failure: nothing remembered
                raise
            except (CertificateUnavailable, Refused) as exc:
                with self._lock:
                    self._failed[url] = (self.monotonic() + FAILURE_TTL, exc)
                    self._failed.move_to_end(url)
                    while len(self._failed) > FAILURE_CACHE:
                        self._failed.popitem(last=False)
                raise
            finally:
                with self._lock:
                    self._fetching.pop(url, None)
            with self._lock:
                self._failed.pop(url, None)
                self._keys[url] = public
                while len(self._keys) > CACHE_SIZE:
                    self._keys.popitem(last=False)
            return public

    def _load(self, url: str) -> rsa.RSAPublicKey:
        if not self._fetches.acquire(blocking=False):  # never queue threads behind slow fetches
            raise FetchesBusy(f"{MAX_FETCHES} certificate fetches already in flight")
        try:
            pem = self.fetch(url)
        except (OSError, urllib.error.URLError) as exc:
            raise CertificateUnavailable(f"cannot fetch {url}: {exc}") from None
        finally:
            self._fetches.release()
        try:
            public = x509.load_pem_x509_certificate(pem).public_key()
        except ValueError:
            raise Refused(f"{url} is not a PEM certificate") from None
        if not isinstance(public, rsa.RSAPublicKey):
            raise Refused(f"{url} does not hold an RSA key")
        return public

    def verify_sync(self, message: Any) -> dict[str, Any]:
        """The message, verified; raises Refused (or CertificateUnavailable: retry later)."""
        signature = self.check(message)
        public = self.key(message["SigningCertURL"])
        try:
            public.verify(signature, canonical(message), padding.PKCS1v15(),
                          HASHES[message["SignatureVersion"]]())
        except InvalidSignature:
            raise Refused("the signature does not verify") from None
        if message["TopicArn"] not in self.topics:  # only now: a signed message from AWS
            raise Refused(f"topic not allowed: {message['TopicArn'][:300]!r}")
        return dict(message)

    async def verify(self, message: Any) -> dict[str, Any]:
        """verify_sync off the event loop (a certificate fetch blocks)."""
        self.check(message)  # cheap refusals answer without a thread
        return await anyio.to_thread.run_sync(self.verify_sync, message)

    async def get(self, url: str) -> bytes:
        """Fetch a URL through the same seam (a SubscribeURL, already checked)."""
        return await anyio.to_thread.run_sync(self.fetch, url)


class CertificateUnavailable(Exception):
    """The signing certificate could not be fetched: answer 503 so SNS retries."""


# a JSON string, escapes included; possessive, and an unclosed one runs to the end, so a body
# of unmatched quotes is one linear pass (a backtracking pattern took minutes on 512 KiB)
_STRINGS = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests at most `limit` deep (checked before the recursive parser)."""
    depth = 0
    for bracket in _BRACKETS.finditer(_STRINGS.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > limit:
            return False
    return True


def loads(text: str | bytes) -> Any:
    """json.loads, at most MAX_JSON_DEPTH deep; raises ValueError."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not json_depth_ok(text):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return json.loads(text)


class FetchesBusy(CertificateUnavailable):
    """MAX_FETCHES certificate fetches are in flight: 503 now, nothing remembered."""
