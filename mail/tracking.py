"""Open and click tracking in a message: which links are tracked, their rewriting, the tokens.

A broadcast's tracked links are the http(s) links its templates write literally (an href in
the HTML part, a bare URL in the text part), read as Python's HTML parser reads them (its tag
and attribute patterns, by a linear scanner: `hrefs`) and decoded as a browser decodes an
attribute: `&amp;` is `&`, `&copy=1` stays as it is. They are stored
once per broadcast (table broadcast_links); at render every occurrence of a stored URL
becomes PUBLIC_URL/c/{token}, and the HTML part gets a 1x1 image PUBLIC_URL/o/{token}.
pgcast's own URLs (unsubscribe, preferences, view in browser: anything under PUBLIC_URL)
are never tracked, nor a link whose URL a template tag makes (it may differ per contact).

A token is signed (HMAC-SHA256, 96 bits) with a key derived from the unsubscribe secret's
first key; every key is accepted, so keys rotate as unsubscribe keys do. It names the
broadcast, the link's index, when the message was rendered, and in `contact` mode the
contact; in `aggregate` mode a random number per message instead (never stored: see
docs/tracking.md). Nothing in it is secret; the signature makes it unforgeable.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import html
import html.entities
import html.parser
import os
import re
import struct
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pgcast.mail import errors, unsubscribe

MODES = ("none", "aggregate", "contact")
MAX_LINKS = 500  # tracked links per broadcast; later ones are left as they are
MAX_URL = 2048  # bytes (UTF-8) of a tracked URL; a longer one is left as it is
KIND_CLICK = 1
KIND_OPEN = 2
_CONTACT = 0x08  # flag: the token names a contact (else a random per-message number)
_VERSION = 0x10  # the high nibble of the first byte
_MAC = 12  # bytes of HMAC-SHA256 kept
_BID = struct.Struct(">B16sI")  # flags | kind, broadcast id, rendered at (Unix seconds)
MAX_TOKEN = 120  # characters of a token we try to read
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_BARE_URL = re.compile(r"https?://[^\s<>\"'\x00-\x1f\x7f]+", re.IGNORECASE)  # linear
_TRAILING = ".,;:!?'\""  # punctuation after a bare URL in text is not part of it
_REF = re.compile(r"&(#[xX][0-9a-fA-F]+;?|#[0-9]+;?|[A-Za-z0-9]+;?)")
_TEMPLATE_TAGS = ("{{", "{%", "{#")
PIXEL_STYLE = "display:block;border:0;width:1px;height:1px"
# the HTML parser's own tag and attribute scanners (not in its typed interface)
_TAGFIND: re.Pattern[str] = vars(html.parser)["tagfind_tolerant"]
_ATTRFIND: re.Pattern[str] = vars(html.parser)["attrfind_tolerant"]


class InvalidToken(errors.MailError):
    """A tracking token that is malformed, altered, forged or made with a key we no longer have."""


def validate_mode(raw: object) -> str:
    """A tracking mode (none, aggregate, contact); raises InvalidValue."""
    if not isinstance(raw, str) or raw not in MODES:
        raise errors.InvalidValue("track", "must be one of none, aggregate, contact")
    return raw


@functools.lru_cache(maxsize=16)
def _mac_key(secret: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"pgcast tracking token v1").derive(secret.encode())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class Ref:
    """What a tracking token names."""

    kind: int  # KIND_CLICK or KIND_OPEN
    broadcast_id: uuid.UUID
    rendered_at: int  # Unix seconds: when the message was rendered (just before it was sent)
    link: int | None  # a click's link index
    contact_id: int | None  # `contact` mode only
    message: int  # the contact id, or the random number of one message (aggregate)


def read(keys: unsubscribe.Keys, token: str) -> Ref:
    """What a token names; raises InvalidToken (malformed, truncated, forged)."""
    if not token or len(token) > MAX_TOKEN or not _TOKEN.fullmatch(token):
        raise InvalidToken("malformed")  # only as written: URL-safe base64, no padding
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed") from None
    if len(raw) < _BID.size + 4 + _MAC:
        raise InvalidToken("malformed")
    head, kind_byte = raw[:-_MAC], raw[0]
    if kind_byte & 0xF0 != _VERSION:
        raise InvalidToken("unknown version")
    kind, contact = kind_byte & 0x07, bool(kind_byte & _CONTACT)
    want = _BID.size + (2 if kind == KIND_CLICK else 0) + (8 if contact else 4) + _MAC
    if kind not in (KIND_CLICK, KIND_OPEN) or len(raw) != want:
        raise InvalidToken("malformed")
    mac = raw[-_MAC:]
    if not any(hmac.compare_digest(hmac.new(_mac_key(s), head, hashlib.sha256).digest()[:_MAC],
                                   mac) for s in keys.secrets):
        raise InvalidToken("not a token we made")
    _, bid, at = _BID.unpack_from(head)
    at_link = _BID.size
    link = None
    if kind == KIND_CLICK:
        link = struct.unpack_from(">H", head, at_link)[0]
        at_link += 2
    if contact:
        who: int = struct.unpack_from(">q", head, at_link)[0]
        return Ref(kind, uuid.UUID(bytes=bid), at, link, who, who)
    return Ref(kind, uuid.UUID(bytes=bid), at, link, None,
               struct.unpack_from(">I", head, at_link)[0])


def attribute_value(raw: str) -> str:
    """An attribute's raw text decoded as HTML decodes an attribute value.

    A named reference without `;` followed by a letter, a digit or `=` stays as it is in an
    attribute (`?a=1&copy=2` keeps `&copy`); elsewhere html.unescape's rules (HTML5's).
    """
    def one(m: re.Match[str]) -> str:
        ref = m.group(1)
        if ref.startswith("#"):
            return html.unescape(m.group(0))
        if ref.endswith(";") and ref in html.entities.html5:
            return html.entities.html5[ref]
        name = ref.rstrip(";")
        for end in range(len(name), 0, -1):  # the longest legacy name (no `;`) it starts with
            if name[:end] in html.entities.html5:
                if end < len(name) or (m.end() < len(m.string) and m.string[m.end()] == "="
                                       and not ref.endswith(";")):
                    return m.group(0)  # followed by an alphanumeric or `=`: not a reference
                return html.entities.html5[name[:end]] + ref[end:]
        return m.group(0)

    return _REF.sub(one, raw) if "&" in raw else raw


@dataclass(frozen=True)
class Href:
    """One href of an <a> or <area> start tag: its decoded value and where its raw text is."""

    url: str
    start: int  # offset of the value's raw text in the document (quotes excluded)
    end: int
    quote: str  # '"', "'" or "" (unquoted)


_LOCATE: re.Pattern[str] = vars(html.parser)["locatestarttagend_tolerant"]
# where markup may start: a comment, a declaration or processing instruction, an end tag, a
# start tag (a letter). Searched from one position to the next: linear in the document.
_MARKUP = re.compile(r"<(!--|!|\?|/[a-zA-Z]|[a-zA-Z])")
_RAW_TEXT = {"script": re.compile(r"</\s*script\s*>", re.IGNORECASE),  # the parser's own
             "style": re.compile(r"</\s*style\s*>", re.IGNORECASE)}


def _href_of(start: int, raw: str) -> Href | None:
    """The first href of one <a>/<area> start tag (raw, at `start`), decoded; None if none."""
    k = _TAGFIND.match(raw, 1)
    if k is None:
        return None
    pos = k.end()
    while pos < len(raw):  # the HTML parser's own attribute scan, on this tag only
        m = _ATTRFIND.match(raw, pos)
        if not m:
            return None
        name, rest, value = m.group(1, 2, 3)
        if name.lower() == "href":
            if not rest:
                return None
            quote = value[:1] if value[:1] in "'\"" and value[-1:] == value[:1] \
                and len(value) >= 2 else ""
            inner = value[1:-1] if quote else value
            begin = start + m.start(3) + (1 if quote else 0)
            # the first href is the one a browser follows
            return Href(attribute_value(inner), begin, begin + len(inner), quote)
        pos = m.end()
    return None


MAX_TAG = 8192  # characters of one start tag we read; a longer one is left as text


class _Scan:
    """Where the next `>` and `<` are, found once per position (starts only move forward)."""

    def __init__(self, document: str) -> None:
        self.document = document
        self.gt = self.lt = -1  # positions found (or len: none), valid while ahead
        self.closers: dict[str, int] = {}  # -1: none from there on (nor from any later place)

    def next(self, closer: str, at: int) -> int:
        """The next `closer` at or after `at`, or -1 (each string found once per position)."""
        found = self.closers.get(closer)
        if found is None or (0 <= found < at):
            found = self.document.find(closer, at)
            self.closers[closer] = found
        return found if found >= at else -1

    def text_until(self, start: int) -> int:
        """Where the parser resumes after markup at `start` that never ends (read as text):
        after the next `>`, else at the next `<`, else one character on."""
        d = self.document
        if self.gt <= start:
            found = d.find(">", start + 1)
            self.gt = found if found >= 0 else len(d) + 1
        if self.gt <= len(d):
            return self.gt + 1
        if self.lt <= start:
            found = d.find("<", start + 1)
            self.lt = found if found >= 0 else len(d) + 1
        return self.lt if self.lt <= len(d) else start + 1


def hrefs(document: str) -> list[Href]:
    """The hrefs of a document's <a> and <area> tags, in order, as Python's HTML parser reads
    them (its own tag and attribute patterns; comments, declarations, script/style text and
    unfinished markup treated as it treats them), without its per-character work on text.
    Linear in the document: a start tag is read within MAX_TAG characters, the next `>` and
    `<` are found once per position, and the tag scans together may read at most a few times
    the document (beyond that, the rest is left as it is)."""
    found: list[Href] = []
    scan = _Scan(document)
    budget = 4 * len(document) + 4 * MAX_TAG  # characters the tag scans may cover
    pos = 0
    while True:
        m = _MARKUP.search(document, pos)
        if m is None:
            return found
        start, kind = m.start(), m.group(1)
        if kind != "!" and kind != "?" and not kind.startswith("/") and kind != "!--":
            limit = min(len(document), start + MAX_TAG)
            t = _LOCATE.match(document, start, limit)
            j = t.end() if t is not None else start
            budget -= j - start + 1
            if budget < 0:
                return found
            nxt = document[j:j + 1] if j < limit else ""
            if nxt == ">":
                end = j + 1
            elif document.startswith("/>", j) and j + 2 <= limit:
                end = j + 2
            elif nxt == "" or nxt == "/" or nxt.isascii() and (nxt.isalpha() or nxt == "="):
                pos = scan.text_until(start)  # unfinished: text, as at the parser's close
                continue
            else:  # bogus: the parser reads it as text up to there
                pos = j if j > start else start + 1
                continue
            raw = document[start:end]
            name = _TAGFIND.match(raw, 1)
            tag = name.group(1).lower() if name is not None else ""
            if tag in ("a", "area"):
                href = _href_of(start, raw)
                if href is not None:
                    found.append(href)
            elif tag in _RAW_TEXT and not raw.endswith("/>"):
                close = _RAW_TEXT[tag].search(document, end)
                if close is None:
                    return found  # the rest is script or style text
                pos = close.start()
                continue
            pos = end
            continue
        closer = "-->" if kind == "!--" else "]]>" if document.startswith("<![", start) else ">"
        end = scan.next(closer, m.end())
        pos = end + len(closer) if end >= 0 else scan.text_until(start)  # never closed: text


def bare_urls(text: str) -> list[tuple[int, int, str]]:
    """The http(s) URLs in plain text: (start, end, url), trailing punctuation left out."""
    found = []
    for m in _BARE_URL.finditer(text):
        url = m.group(0).rstrip(_TRAILING)
        while url.endswith((")", "]")) and url.count(url[-1]) > url.count(
                "(" if url[-1] == ")" else "["):
            url = url[:-1].rstrip(_TRAILING)
        found.append((m.start(), m.start() + len(url), url))
    return found


def trackable(url: str, base_url: str) -> bool:
    """Whether a link may be tracked: http(s), literal, short enough, not one of pgcast's own."""
    lowered = url[:8].lower()
    if not (lowered.startswith("https://") or lowered.startswith("http://")):
        return False
    if any(t in url for t in _TEMPLATE_TAGS) or len(url.encode()) > MAX_URL:
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return False
    return not own(url, base_url)


def own(url: str, base_url: str) -> bool:
    """Whether a URL is one of pgcast's own pages (unsubscribe, preferences, web view, ...)."""
    base = base_url.rstrip("/").lower()
    head = url[:len(base) + 1].lower()
    return head == base or head == base + "/" or head.startswith(base + "?")


def links_of(html_source: str | None, text_source: str | None, base_url: str) -> list[str]:
    """The links a broadcast's templates write literally, first appearance first, at most
    MAX_LINKS (what broadcast_links stores)."""
    seen: dict[str, None] = {}
    urls = [h.url.strip(" \t\n\f\r") for h in hrefs(html_source)] if html_source else []
    if text_source:
        urls += [u for _, _, u in bare_urls(text_source)]
    for url in urls:
        if len(seen) >= MAX_LINKS:
            break
        if url not in seen and trackable(url, base_url):
            seen[url] = None
    return list(seen)


def location(url: str) -> str:
    """A stored URL as an HTTP Location value: what a browser requests for it (IDNA host,
    UTF-8 percent-encoding of anything outside printable ASCII; the rest untouched)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if not netloc.isascii():
        userinfo, at, hostport = netloc.rpartition("@")
        host, colon, port = hostport.partition(":")
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            host = urllib.parse.quote(host, safe="")
        netloc = f"{userinfo}{at}{host}{colon}{port}"
    rest = url[len(parts.scheme) + 3 + len(parts.netloc):] if "://" in url[:12] else ""
    safe = "".join(chr(c) for c in range(0x21, 0x7F))  # printable ASCII stays as written
    return f"{parts.scheme}://{netloc}{urllib.parse.quote(rest, safe=safe)}"


class Tracker:
    """Rewrites one broadcast's messages: tracked links to /c/, an open pixel to /o/."""

    def __init__(self, broadcast_id: str, mode: str, links: tuple[str, ...],
                 keys: unsubscribe.Keys, base_url: str) -> None:
        self.mode = validate_mode(mode)
        self.index = {url: i for i, url in enumerate(links)}
        self.base_url = base_url
        self.key = _mac_key(keys.secrets[0])
        self.bid = uuid.UUID(broadcast_id).bytes
        self.contact = mode == "contact"

    def _maker(self, contact_id: int) -> Callable[[int, int | None], str]:
        """Tokens for one message: (kind, link) -> token; one rendered-at and message number."""
        at = int(time.time()) & 0xFFFFFFFF
        who = struct.pack(">q", contact_id) if self.contact else os.urandom(4)
        flags = _VERSION | (_CONTACT if self.contact else 0)
        key = self.key

        def make(kind: int, link: int | None) -> str:
            head = _BID.pack(flags | kind, self.bid, at)
            if link is not None:
                head += struct.pack(">H", link)
            head += who
            return _b64(head + hmac.new(key, head, hashlib.sha256).digest()[:_MAC])

        return make

    def rewrite(self, html_part: str | None, text_part: str | None,
                contact_id: int) -> tuple[str | None, str | None]:
        """The message's parts with tracked links rewritten and the open pixel added."""
        if self.mode == "none":
            return html_part, text_part
        make = self._maker(contact_id)
        if html_part is not None:
            out: list[str] = []
            at = 0
            for h in hrefs(html_part):
                i = self.index.get(h.url.strip(" \t\n\f\r"))
                if i is None:
                    continue
                out.append(html_part[at:h.start])
                value = html.escape(f"{self.base_url}/c/{make(KIND_CLICK, i)}", quote=True)
                out.append(value if h.quote else f'"{value}"')
                at = h.end
            out.append(html_part[at:])
            document = "".join(out)
            pixel = (f'<img src="{self.base_url}/o/{make(KIND_OPEN, None)}" width="1" '
                     f'height="1" alt="" style="{PIXEL_STYLE}">')
            end = document.lower().rfind("</body>")
            html_part = (document[:end] + pixel + document[end:] if end != -1
                         else document + pixel)
        if text_part is not None and self.index:
            pieces: list[str] = []
            at = 0
            for start, end_at, url in bare_urls(text_part):
                i = self.index.get(url)
                if i is None:
                    continue
                pieces += [text_part[at:start], f"{self.base_url}/c/{make(KIND_CLICK, i)}"]
                at = end_at
            pieces.append(text_part[at:])
            text_part = "".join(pieces)
        return html_part, text_part
