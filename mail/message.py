"""One broadcast's content, compiled once, and the message it makes for each recipient.

User data is data: a display name or a subject never becomes header syntax. Header values
are built here from structured parts and stored with `set_raw`, so Python's header parser
never reads them back: its address parser decodes encoded words even inside quoted
strings, and its unstructured parser decodes `=?...?=` found in a subject, which is how a
stored subject once became a real `Bcc:` line. A display name or subject that is not plain
printable ASCII free of `=?` is sent as RFC 2047 encoded words (base64: no syntax inside);
addresses come out of `email.headerregistry.Address` with the domain in IDNA form.
"""

from __future__ import annotations

import base64
import email.header
import email.headerregistry
import email.message
import email.policy
import email.utils
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pgcast.mail import errors, plaintext, sandbox, template, tracking, unsubscribe, validate

# SMTP line endings; raw header values are written as given (they are folded here)
POLICY = email.policy.SMTP.clone(cte_type="7bit", refold_source="none")
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe=One-Click"  # RFC 8058's one fixed value
TEST_PREFIX = "[TEST] "
SKELETON_ADDRESS = "skeleton@example.invalid"  # the To of a skeleton (Content.fill replaces it)
_PLAIN = re.compile(r"[ -~]*")  # printable ASCII
_SIMPLE_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")
# printable ASCII without " and \, no space at either end, at most LONG characters
_SIMPLE_NAME = re.compile(r'[!#-\[\]-~](?:[ !#-\[\]-~]{0,498}[!#-\[\]-~])?')
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")


@dataclass(frozen=True)
class Message:
    """One composed email for one recipient; `to` and `from_address` are header values."""

    contact_id: int
    to: str
    from_address: str
    subject: str
    text: str | None
    html: str | None
    headers: dict[str, str] = field(default_factory=dict)
    to_address: str = ""
    broadcast_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # a message's own SES EmailTags


_new = object.__new__


def filled_message(contact_id: int, to: str, from_address: str, subject: str,
                   text: str | None, html: str | None, headers: dict[str, str],
                   to_address: str, broadcast_id: str) -> Message:
    """Message(...) without the frozen dataclass's object.__setattr__ per field (issue 32: a
    fifth of a filled message's cost): the same fields, the same class, no tags."""
    made = _new(Message)
    fields = made.__dict__
    fields["contact_id"] = contact_id
    fields["to"] = to
    fields["from_address"] = from_address
    fields["subject"] = subject
    fields["text"] = text
    fields["html"] = html
    fields["headers"] = headers
    fields["to_address"] = to_address
    fields["broadcast_id"] = broadcast_id
    fields["tags"] = {}
    return made


@dataclass(frozen=True)
class Skeleton:
    """A broadcast's message rendered once with a stand-in token (`marker`): what every
    recipient's message is made from by Content.fill (see template.links_printed)."""

    marker: str
    message: Message


def one_line(value: str) -> str:
    """Control characters and line breaks become single spaces (stored data predates checks)."""
    return _LINE_BREAKS.sub(" ", value).strip()


LONG = 500  # characters: a longer value is sent as folded encoded words (lines <= 998)


def _needs_encoding(value: str) -> bool:
    return "=?" in value or len(value) > LONG or _PLAIN.fullmatch(value) is None


def encode_words(value: str, header_name: str) -> str:
    """RFC 2047 encoded words (UTF-8, base64), folded with CRLF."""
    return email.header.Header(value, "utf-8", header_name=header_name).encode(linesep="\r\n")


def phrase(display_name: str, header_name: str) -> str:
    """A display name as data: a quoted string when plain ASCII, else encoded words."""
    if not display_name:
        return ""
    if _SIMPLE_NAME.fullmatch(display_name) and "=?" not in display_name:
        # what the steps below give for it (issue 32): nothing to take out or strip (no
        # control character, no space at either end), plain and short (no encoding), and
        # nothing to escape (no " or \)
        return '"' + display_name + '"'
    name = one_line(display_name)
    if not name:
        return ""
    if _needs_encoding(name):
        return encode_words(name, header_name)
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def addr_spec(address: str) -> str:
    """An address as an addr-spec: the domain in IDNA form; raises RenderError."""
    candidate = address.strip()
    if _SIMPLE_ADDRESS.fullmatch(candidate) and candidate.count("@") == 1:
        # what Address(...).addr_spec below gives for it, without building one (issue 32: a
        # third of a filled message's cost): a non-empty dot-atom-text local part (none of
        # its characters is a special or a space: never quoted) and a non-empty domain
        return candidate
    try:  # the slow path: IDNA domains, quoted local parts, older rows never checked
        candidate = validate.address(candidate)
    except errors.InvalidValue as exc:
        raise errors.RenderError(f"cannot send to this address: {exc.reason}") from None
    local, _, domain = candidate.rpartition("@")
    return str(email.headerregistry.Address(username=local, domain=domain).addr_spec)


def mailbox(display_name: str | None, address: str, header_name: str) -> str:
    """`phrase <addr-spec>`, or the addr-spec alone without a name."""
    spec = addr_spec(address)
    shown = phrase(display_name or "", header_name)
    return f"{shown} <{spec}>" if shown else spec


def subject_header(subject: str) -> str:
    """A subject as a header value: ASCII as it is, anything else (or `=?`) encoded."""
    return encode_words(subject, "Subject") if _needs_encoding(subject) else subject


class Content:
    """What every message of one broadcast shares, compiled once per process."""

    def __init__(self, broadcast_id: str, account: str, subject: str, from_address: str,
                 text: str | None, html: str | None, *,
                 keys: unsubscribe.Keys | None = None,
                 base_url: str = unsubscribe.DEFAULT_PUBLIC_URL, test: bool = False,
                 inert: bool = False, timeout_ms: int | None = None, track: str = "none",
                 links: tuple[str, ...] = ()) -> None:
        self.timeout_ms = template.timeout_ms() if timeout_ms is None else timeout_ms
        self.key = uuid.uuid4().hex  # names it in a render process's cache
        self.broadcast_id = str(broadcast_id)
        self.account = account
        self.subject_source = subject
        self.from_source = from_address
        self.text_source = text
        self.html_source = html
        # without configured keys (unit tests, benchmarks): a key of this process only
        self.keys = keys or unsubscribe.Keys((os.urandom(32).hex(),))
        self.base_url = base_url
        self.test = test  # a test send: subject prefixed, unsubscribe link inert
        self.inert = inert or test  # unsubscribe links show the page, unsubscribe nobody
        self._token = self.keys.maker(account, self.broadcast_id, self.inert)
        # opens and clicks (mail.tracking): never in a test send
        self.track = "none" if test else track
        self.links = tuple(links)
        self._tracker = (tracking.Tracker(self.broadcast_id, self.track, self.links,
                                          self.keys, base_url)
                         if self.track != "none" else None)
        self.problem: str | None = None  # the broadcast cannot be sent: every message says why
        self.from_header = ""
        self.broadcast_vars = {"id": self.broadcast_id, "subject": subject}
        self._subject: template.Renderer = lambda context: ""
        self._text: template.Renderer | None = None
        self._html: template.Renderer | None = None
        self._text_from_html = False  # convert the rendered html per recipient
        self._text_made: str | None = None  # the text template made from the html
        try:
            display, spec = validate.sender(from_address)
            self.from_header = mailbox(display, spec, "From")
            self._subject = template.compile_part("subject", subject)
            if html is not None:
                self._html = template.compile_part("html", html)
            if text is not None:
                self._text = template.compile_part("text", text)
            elif html is not None:
                made = plaintext.template(html)
                if made is None:
                    self._text_from_html = True
                else:
                    self._text = template.compile_part("text", made)
                    self._text_made = made
        except (errors.InvalidValue, errors.RenderError) as exc:
            self.problem = f"the broadcast cannot be sent: {exc}"

    @classmethod
    def from_row(cls, row: dict[str, Any], *, test: bool = False) -> Content:
        """From a broadcast_content row; keys and URL from the settings or the database key."""
        keys = unsubscribe.keys_from(os.environ.get("PGCAST_UNSUBSCRIBE_SECRET"),
                                     row.get("unsubscribe_key"))
        base_url = unsubscribe.public_url(os.environ.get("PGCAST_PUBLIC_URL"))
        return cls(str(row["id"]), row["account"], row["subject"], row["from_address"],
                   row["text_body"], row["html_body"], keys=keys, base_url=base_url, test=test,
                   track=row.get("track") or "none", links=tuple(row.get("links") or ()))

    def render(self, contact_id: int, email_address: str, name: str | None,
               attributes: dict[str, Any] | None = None,
               tags: list[str] | None = None, deliver_to: str | None = None,
               token: str | None = None) -> Message:
        """The message for one recipient; raises RenderError when it cannot be built.

        `deliver_to` (a test send) addresses the message elsewhere; the contact's own data
        still fills the template. `token` (view in browser) renders the links with the token
        the person's message carried, so the page is the message they got.
        """
        if self.problem:
            raise errors.RenderError(self.problem)
        with sandbox.charged(self.timeout_ms):  # one budget for the message's three parts
            return self._render(contact_id, email_address, name, attributes, tags, deliver_to,
                                token)

    def _render(self, contact_id: int, email_address: str, name: str | None,
                attributes: dict[str, Any] | None, tags: list[str] | None,
                deliver_to: str | None, token: str | None = None) -> Message:
        spec, to = self._to(deliver_to or email_address, name)
        # one token per message: the unsubscribe, preference and web links all carry it
        token = token or self._token(contact_id)
        link = unsubscribe.link(self.base_url, token)
        context = {
            "contact": {"email": email_address, "name": name or "", "tags": list(tags or []),
                        "attributes": dict(attributes or {})},
            "broadcast": self.broadcast_vars,
            "unsubscribe_url": link,
            "preferences_url": f"{self.base_url}/p/{token}",
            "web_url": f"{self.base_url}/v/{token}",
        }
        subject = one_line(self._subject(context))
        if self.test:
            subject = TEST_PREFIX + subject
        html = self._html(context) if self._html else None
        if self._text is not None:
            text: str | None = self._text(context)
        elif self._text_from_html and html is not None:
            text = plaintext.convert(html)
        else:
            text = None
        if self._tracker is not None:
            html, text = self._tracker.rewrite(html, text, contact_id)
        return Message(contact_id, to, self.from_header, subject, text, html,
                       self._headers(link), spec, self.broadcast_id)

    @staticmethod
    def _to(address: str, name: str | None) -> tuple[str, str]:
        """The recipient's addr-spec and To header value; raises RenderError."""
        if (_SIMPLE_ADDRESS.fullmatch(address) is not None and address.count("@") == 1
                and (not name or (_SIMPLE_NAME.fullmatch(name) is not None
                                  and "=?" not in name))):
            # what the calls below give by their fast paths, without them (issue 32: one
            # per recipient of a group): the address as it is (the pattern holds no space,
            # nothing to strip), the name quoted as it is
            return address, '"' + name + '" <' + address + ">" if name else address
        spec = addr_spec(address)
        shown = phrase(name or "", "To")
        return spec, f"{shown} <{spec}>" if shown else spec

    def _headers(self, link: str) -> dict[str, str]:
        return {"List-Unsubscribe": f"<{link}>",
                "List-Unsubscribe-Post": LIST_UNSUBSCRIBE_POST,
                "X-Pgcast-Broadcast": self.broadcast_id}

    def reads_contact(self) -> bool:
        """Whether a template of this content reads `contact` (its name, tags or attributes):
        when none does, the worker claims no attributes or tags. Parsed once."""
        if not hasattr(self, "_reads_contact"):
            self._reads_contact = not self.problem and any(
                source is not None and template.uses(source, "contact")
                for source in (self.subject_source, self.text_source, self.html_source))
        return self._reads_contact

    def links_printed(self) -> tuple[int, int, int] | None:
        """The links (template.LINKS) the subject, text and html print, when the whole message
        can be made from a skeleton (Content.fill): every part a template that prints nothing
        per recipient but its links (template.links_printed), no tracking (its rewrite is per
        contact), no text converted from each rendered html. None otherwise. Parsed once."""
        if not hasattr(self, "_links_printed"):
            self._links_printed = self._count_links()
        return self._links_printed

    def _count_links(self) -> tuple[int, int, int] | None:
        if self.problem or self._tracker is not None or self._text_from_html:
            return None
        text_source = self.text_source if self.text_source is not None else self._text_made
        counts = [template.links_printed(part, source) if source is not None else 0
                  for part, source in (("subject", self.subject_source), ("text", text_source),
                                       ("html", self.html_source))]
        if any(n is None for n in counts):
            return None
        return (counts[0] or 0, counts[1] or 0, counts[2] or 0)

    def stand_in(self) -> str:
        """A stand-in token for a skeleton: random, with a real token's length and alphabet
        (so an escaped part and the output limit treat it as they treat the real one)."""
        return base64.urlsafe_b64encode(os.urandom(54)).rstrip(b"=").decode()

    def skeleton(self, marker: str) -> Skeleton:
        """The message rendered with `marker` as its token (in a render process: it runs the
        templates); raises RenderError as render does."""
        return Skeleton(marker, self.render(0, SKELETON_ADDRESS, None, token=marker))

    def usable(self, skeleton: Skeleton) -> bool:
        """Whether `skeleton` is one this content can fill: it prints its marker exactly where
        the templates print a link, and the marker is a token's length."""
        counts = self.links_printed()
        made = skeleton.message
        marker = skeleton.marker
        return (counts is not None and len(marker) == len(self._token(0))
                and made.subject.count(marker) == counts[0]
                and (made.text or "").count(marker) == counts[1]
                and (made.html or "").count(marker) == counts[2])

    def fill(self, skeleton: Skeleton, contact_id: int, email_address: str,
             name: str | None) -> Message:
        """One recipient's message from a usable skeleton (Content.usable), in this process,
        running no template: what render gives, byte for byte (a fresh token in place of the
        marker); raises RenderError when the address cannot be sent to, as render does."""
        made = self.filler(skeleton).fill([(contact_id, email_address, name)])[0]
        if isinstance(made, Exception):
            raise made
        return made

    def filler(self, skeleton: Skeleton) -> Filler:
        """The Filler of a usable skeleton (the last one asked for is kept)."""
        kept: Filler | None = getattr(self, "_filler", None)
        if kept is None or kept.skeleton is not skeleton:
            kept = self._filler = Filler(self, skeleton)
        return kept


class Filler:
    """Recipients' messages from one usable skeleton (Content.usable), what Content.render
    gives byte for byte with a fresh token in place of the marker, made a group at a time:
    the skeleton's parts are split at the marker once (each message joins them around its
    token), the group's tokens are made together (Keys.many_maker), and each message is
    built without the frozen dataclass's per-field cost (issue 32: the worker's CPU per
    recipient of a null-provider drain)."""

    def __init__(self, content: Content, skeleton: Skeleton) -> None:
        self.skeleton = skeleton
        made = skeleton.message
        marker = skeleton.marker
        self.subject = made.subject.split(marker)
        self.text = None if made.text is None else made.text.split(marker)
        self.html = None if made.html is None else made.html.split(marker)
        self.from_header = content.from_header
        self.broadcast_id = content.broadcast_id
        self.unsubscribe = "<" + unsubscribe.link(content.base_url, "")  # + token + ">"
        self.tokens = content.keys.many_maker(content.account, content.broadcast_id,
                                              content.inert)

    def fill(self, items: Sequence[tuple[Any, ...]]) -> list[Message | Exception]:
        """A message per (contact id, address, name, ...), in order, or the exception
        (RenderError: an address that cannot be sent to) that Content.render raises."""
        tokens = self.tokens([item[0] for item in items])
        subject, text, html = self.subject, self.text, self.html
        lone = subject[0] if len(subject) == 1 else None  # a subject without a link
        sender, bid, prefix = self.from_header, self.broadcast_id, self.unsubscribe
        to_of = Content._to
        out: list[Message | Exception] = []
        for item, token in zip(items, tokens, strict=True):
            try:
                spec, to = to_of(item[1], item[2])
            except Exception as exc:  # noqa: BLE001 - this recipient's, as render's
                out.append(exc)
                continue
            out.append(filled_message(
                item[0], to, sender, lone if lone is not None else token.join(subject),
                None if text is None else token.join(text),
                None if html is None else token.join(html),
                {"List-Unsubscribe": prefix + token + ">",
                 "List-Unsubscribe-Post": LIST_UNSUBSCRIBE_POST,
                 "X-Pgcast-Broadcast": bid}, spec, bid))
        return out


def to_rfc5322(message: Message, message_id: str, date: str | None = None) -> bytes:
    """The message as RFC 5322 bytes with CRLF line endings."""
    mail = email.message.EmailMessage(policy=POLICY)
    # set_raw: stored exactly as built above, never parsed (see the module docstring)
    mail.set_raw("From", message.from_address)
    mail.set_raw("To", message.to)
    mail.set_raw("Subject", subject_header(message.subject))
    mail.set_raw("Date", date or email.utils.formatdate(localtime=False, usegmt=True))
    mail.set_raw("Message-ID", message_id)
    for key, value in message.headers.items():
        mail.set_raw(key, one_line(value))
    if message.text is not None:
        mail.set_content(message.text)
        if message.html is not None:
            mail.add_alternative(message.html, subtype="html")
    else:
        mail.set_content(message.html or "", subtype="html")
    return mail.as_bytes(policy=POLICY)


def make_message_id(domain: str = "pgcast.local") -> str:
    """A fresh Message-ID."""
    return f"<{uuid.uuid4().hex}@{domain}>"


def unfolded(value: str) -> str:
    """A header value on one line (for SES's JSON fields): folds become spaces."""
    return value.replace("\r\n", "")


def ses_subject(subject: str) -> str:
    """A subject for SES's Subject.Data (UTF-8): encoded words only where `=?` would be read."""
    return unfolded(encode_words(subject, "Subject")) if "=?" in subject else subject
