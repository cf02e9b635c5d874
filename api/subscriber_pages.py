"""The subscriber's public pages (no auth; a token or a form id in the path is the key).

GET/POST /f/{id}             the sign-up form; the same answer whoever the address is
GET/POST /f/confirm/{token}  GET shows a Confirm button (mail scanners follow links), POST
                             confirms
GET/POST /p/{token}          the preference page (the unsubscribe link's token)
GET /v/{token}               the broadcast as that person received it
GET /a/{slug}, /a/{slug}/{id}  an account's public archive, rendered with no one's data
"""

from __future__ import annotations

import ipaddress
import os
import time
import urllib.parse
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from pgcast.api import context, db, errors, http, rendering
from pgcast.api import subscriber_html as pages
from pgcast.api import unsubscribe as unsubscribe_routes
from pgcast.mail import confirm, unsubscribe
from pgcast.mail import errors as mail_errors
from pgcast.mail import validate as validate_mail
from pgcast.sql import errors as sql_errors

MAX_FORM = 4096  # bytes of a sign-up, confirm or preference POST
MAX_CONFIRMATIONS = 3  # confirmation mails per address per 24 hours
RATE_ENV = "PGCAST_FORM_RATE"  # POSTs per client address per minute
DEFAULT_RATE = 10
WINDOW = 60.0  # seconds
MAX_CLIENTS = 100_000  # client addresses remembered before the table starts over
HONEYPOT = "website"  # a field people never see; a bot that fills it is answered, not served
PROXIES_ENV = "PGCAST_TRUSTED_PROXIES"  # addresses/CIDRs whose X-Forwarded-For is believed

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_proxies(raw: str) -> tuple[Network, ...]:
    """PGCAST_TRUSTED_PROXIES: comma-separated addresses or CIDRs; raises InvalidInput."""
    nets = []
    for part in raw.split(","):
        if part.strip():
            try:
                nets.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise sql_errors.InvalidInput(
                    f"{PROXIES_ENV}: {part.strip()!r} is not an IP address or CIDR") from None
    return tuple(nets)


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(peer: str, forwarded: list[str], proxies: tuple[Network, ...]) -> str:
    """The address a client is counted under: the connection's peer; when the peer is a
    trusted proxy, the right-most X-Forwarded-For entry that is not a trusted proxy (entries
    left of it were written by the client and prove nothing)."""
    if not _trusted(peer, proxies):
        return peer
    hops = [h.strip() for value in forwarded for h in value.split(",")]
    hops = [h for h in hops if h]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:  # garbage a trusted proxy passed on: counted as that proxy
                return peer
    return hops[0] if hops else peer  # every hop a proxy of ours


class ClientLimit:
    """POSTs per client address per minute, in this process (fixed one-minute windows)."""

    def __init__(self, per_minute: int, proxies: tuple[Network, ...] = ()) -> None:
        self.per_minute = per_minute
        self.proxies = proxies
        self.window = -float("inf")
        self.seen: dict[str, int] = {}

    def allow(self, client: str, now: float) -> bool:
        """Count one POST of `client`; False when it is over the limit this minute."""
        if now - self.window >= WINDOW or len(self.seen) >= MAX_CLIENTS:
            self.window, self.seen = now, {}
        n = self.seen.get(client, 0) + 1
        self.seen[client] = n
        return n <= self.per_minute


def _limit(request: Request) -> ClientLimit:
    found: ClientLimit | None = getattr(request.app.state, "form_limit", None)
    if found is None:
        raw = os.environ.get(RATE_ENV, "").strip()
        rate = int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_RATE
        found = request.app.state.form_limit = ClientLimit(
            rate, trusted_proxies(os.environ.get(PROXIES_ENV, "")))
    return found


def _too_fast(request: Request) -> bool:
    limit = _limit(request)
    peer = request.client.host if request.client else "unknown"
    client = client_address(peer, request.headers.getlist("x-forwarded-for"), limit.proxies)
    return not limit.allow(client, time.monotonic())


def check_env() -> None:
    """Refuse a malformed PGCAST_TRUSTED_PROXIES when the app is made (InvalidInput)."""
    trusted_proxies(os.environ.get(PROXIES_ENV, ""))


async def _form_body(request: Request) -> dict[str, list[str]] | None:
    """The urlencoded body, at most MAX_FORM bytes; None when it is anything else."""
    if not request.headers.get("content-type", "").lower().startswith(
            "application/x-www-form-urlencoded"):
        return None
    try:
        raw = await http.read_body(request, MAX_FORM)
        return urllib.parse.parse_qs(raw.decode("utf-8"), max_num_fields=20,
                                     strict_parsing=False)
    except (errors.BodyTooLarge, UnicodeDecodeError, ValueError):
        return None


def _form_id(request: Request) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(request.path_params.get("id", "")))
    except ValueError:
        return None


async def _form(request: Request) -> dict[str, Any] | None:
    form_id = _form_id(request)
    if form_id is None:
        return None
    row = await db.one(context.pool(request), "form_public", {"id": form_id})
    return dict(row) if row else None


def _policy(form: dict[str, Any]) -> str:
    return pages.csp(frame=form["embeddable"],
                     form_to=pages.origin(form["redirect_url"]) if form["redirect_url"] else None)


async def form_page(request: Request) -> Response:
    """GET /f/{id}: the sign-up form."""
    form = await _form(request)
    if form is None:
        return pages.respond(pages.NO_FORM, 404)
    return pages.respond(pages.page("Subscribe", pages.signup_form(f"/f/{form['id']}")),
                         policy=_policy(form), frame=form["embeddable"])


def _answer(form: dict[str, Any]) -> Response:
    """The one answer of a sign-up, whatever the address: the page, or 303 to the redirect."""
    if form["redirect_url"]:
        return RedirectResponse(form["redirect_url"], status_code=303,
                                headers={"Cache-Control": "no-store",
                                         "Referrer-Policy": "no-referrer"})
    return pages.respond(pages.CHECK_INBOX if form["double_opt_in"] else pages.THANKS,
                         policy=_policy(form), frame=form["embeddable"])


async def signup(request: Request) -> Response:
    """POST /f/{id} (urlencoded: email, name): a sign-up; the same answer for every address."""
    if _too_fast(request):
        return pages.respond(pages.TOO_FAST, 429, headers={"Retry-After": str(int(WINDOW))})
    form_id = _form_id(request)
    fields = await _form_body(request)
    if form_id is None or fields is None:
        return await _refused(request, pages.BAD_REQUEST)
    if any(v.strip() for v in fields.get(HONEYPOT, [])):
        # a bot: answered like anyone, nothing stored or sent
        form = await _form(request)
        return _answer(form) if form else pages.respond(pages.NO_FORM, 404)
    try:
        email = validate_mail.address((fields.get("email") or [""])[0])
        name = validate_mail.text_line("name", (fields.get("name") or [""])[0], 200,
                                       required=False)
    except mail_errors.InvalidValue:
        return await _refused(request, pages.page("Subscribe", pages.signup_form(
            f"/f/{form_id}", "Enter a valid email address.")))
    # the mail is composed first (its link names the address, not a contact id), so the
    # sign-up and its confirmation are one statement and one commit
    keys = await unsubscribe_routes.keys(request)
    token = confirm.make(keys, email, form_id)
    subject, text, html = confirm.message(
        confirm.link(unsubscribe_routes.configured_url(), token))
    row = await db.one(context.pool(request), "signup", {
        "form": form_id, "email": email, "name": name, "max_mails": MAX_CONFIRMATIONS,
        "details": "{}",  # no client address: contact events outlive an erasure
        "subject": subject, "text": text, "html": html})
    if row is None:
        return pages.respond(pages.NO_FORM, 404)
    if row["message_id"] is not None:  # queued without a NOTIFY: wake the loops after commit
        request.app.state.waker.request()
    return _answer(dict(row))


async def _refused(request: Request, content: str) -> Response:
    """A 400 page with the form's own headers (404 when there is no such form)."""
    form = await _form(request)
    if form is None:
        return pages.respond(pages.NO_FORM, 404)
    return pages.respond(content, 400, policy=_policy(form), frame=form["embeddable"])


async def _confirmation(request: Request) -> confirm.Confirmation | Response:
    try:
        return confirm.read(await unsubscribe_routes.keys(request),
                            str(request.path_params.get("token", "")))
    except confirm.Expired:
        return pages.respond(pages.EXPIRED, 410)
    except unsubscribe.InvalidToken:
        return pages.respond(pages.INVALID, 400)


async def confirm_page(request: Request) -> Response:
    """GET /f/confirm/{token}: a Confirm button; confirms nothing."""
    found = await _confirmation(request)
    return found if isinstance(found, Response) else pages.respond(pages.CONFIRM)


async def confirm_post(request: Request) -> Response:
    """POST /f/confirm/{token}: confirm the sign-up (idempotent)."""
    if _too_fast(request):
        return pages.respond(pages.TOO_FAST, 429, headers={"Retry-After": str(int(WINDOW))})
    found = await _confirmation(request)
    if isinstance(found, Response):
        return found
    if await _form_body(request) is None:
        return pages.respond(pages.BAD_REQUEST, 400)
    row = await db.one(context.pool(request), "confirm", {
        "email": found.email, "form": found.form_id, "issued": found.issued,
        "details": "{}"})
    if row is None or not row["ok"]:
        return pages.respond(pages.NOT_CONFIRMED, 409)
    if row["redirect_url"]:
        return RedirectResponse(row["redirect_url"], status_code=303,
                                headers={"Cache-Control": "no-store",
                                         "Referrer-Policy": "no-referrer"})
    return pages.respond(pages.CONFIRMED)


async def _target(request: Request) -> unsubscribe.Target | None:
    try:
        return (await unsubscribe_routes.keys(request)).read(
            str(request.path_params.get("token", "")))
    except unsubscribe.InvalidToken:
        return None


async def _preferences(request: Request, target: unsubscribe.Target, note: str = "",
                       status: int = 200) -> Response:
    row = await db.one(context.pool(request), "preferences_page", {
        "contact_id": target.contact_id, "account_prefix": target.account_prefix})
    if row is None:
        return pages.respond(pages.NOT_FOUND, 404)
    return pages.respond(pages.preferences(list(row["topics"]), row["unsubscribed"], note),
                         status)


async def preferences_page(request: Request) -> Response:
    """GET /p/{token}: the person's topics as checkboxes, and unsubscribe from everything."""
    target = await _target(request)
    if target is None:
        return pages.respond(pages.INVALID, 400)
    return await _preferences(request, target)


async def preferences_save(request: Request) -> Response:
    """POST /p/{token}: save the chosen topics (action=save) or unsubscribe from everything."""
    target = await _target(request)
    if target is None:
        return pages.respond(pages.INVALID, 400)
    fields = await _form_body(request)
    action = (fields or {}).get("action", [""])[0]
    if fields is None or action not in ("save", "unsubscribe"):
        return pages.respond(pages.BAD_REQUEST, 400)
    if target.test:
        return await _preferences(request, target, "This link came from a test send: "
                                                   "nothing was changed.")
    if target.account_prefix is not None:  # a version 1 token: its account must match
        found = await db.one(context.pool(request), "preferences_page", {
            "contact_id": target.contact_id, "account_prefix": target.account_prefix})
        if found is None:
            return pages.respond(pages.NOT_FOUND, 404)
    params = {"contact_id": target.contact_id, "broadcast_id": target.broadcast_id}
    if action == "unsubscribe":
        await db.one(context.pool(request), "preferences_unsubscribe", params)
        return await _preferences(request, target, "You are unsubscribed from everything.")
    await db.one(context.pool(request), "preferences_save",
                 {**params, "chosen": fields.get("topic", [])[:200]})
    return await _preferences(request, target, "Your preferences are saved.")


def _content_kwargs(row: dict[str, Any], keys: unsubscribe.Keys, inert: bool) -> dict[str, Any]:
    return {"broadcast_id": str(row["id"]), "account": row["account"],
            "subject": row["subject"], "from_address": row["from_address"],
            "text": row["text_body"], "html": row["html_body"], "keys": keys,
            "base_url": unsubscribe_routes.configured_url(), "inert": inert}


def _message_page(rendered: dict[str, Any]) -> Response:
    body = rendered["html"] if rendered["html"] is not None else pages.text_message(
        rendered["subject"], rendered["text"] or "")
    return pages.respond(body, policy=pages.MESSAGE_CSP)


async def _render(request: Request, row: dict[str, Any], inert: bool,
                  contact: dict[str, Any]) -> Response:
    keys = await unsubscribe_routes.keys(request)
    try:
        rendered = await rendering.preview(request, row["account"],
                                           _content_kwargs(row, keys, inert), contact)
    except errors.InvalidBody:
        return pages.respond(pages.page("Not available",
                                        "<p>This message cannot be shown.</p>"), 503)
    return _message_page(rendered)


async def web_view(request: Request) -> Response:
    """GET /v/{token}: the broadcast as this person received it (never a draft)."""
    target = await _target(request)
    if target is None:
        return pages.respond(pages.INVALID, 400)
    row = await db.one(context.pool(request), "web_view", {
        "contact_id": target.contact_id, "broadcast_id": target.broadcast_id})
    if row is None:
        return pages.respond(pages.NOT_FOUND, 404)
    contact = {"id": row["contact_id"], "email": row["email"], "name": row["name"],
               "attributes": row["attributes"], "tags": row["tags"],
               "token": str(request.path_params["token"])}
    return await _render(request, dict(row), target.test, contact)


# the archive's reader: every merge tag shows its fallback (the address is only the To)
NOBODY = {"id": 0, "email": "", "name": "", "attributes": {}, "tags": [],
          "deliver_to": "archive@example.invalid"}


async def archive_page(request: Request) -> Response:
    """GET /a/{slug}: an account's archived sent broadcasts, newest first."""
    slug = str(request.path_params["slug"])
    rows = await db.all_rows(context.pool(request), "archive_list", {"slug": slug})
    if not rows:
        known = await db.one(context.pool(request), "archive_exists", {"slug": slug})
        if known is None:
            return pages.respond(pages.NOT_FOUND, 404)
    return pages.respond(pages.archive_list("Archive", slug, [
        (str(r["id"]), r["subject"], r["finished_at"].date().isoformat()) for r in rows]))


async def archive_message(request: Request) -> Response:
    """GET /a/{slug}/{id}: one archived broadcast with the merge tags' fallbacks."""
    try:
        bid = uuid.UUID(str(request.path_params["id"]))
    except ValueError:
        return pages.respond(pages.NOT_FOUND, 404)
    row = await db.one(context.pool(request), "archive_broadcast",
                       {"slug": str(request.path_params["slug"]), "id": bid})
    if row is None:
        return pages.respond(pages.NOT_FOUND, 404)
    return await _render(request, dict(row), True, NOBODY)


PAGES = [
    Route("/f/confirm/{token}", confirm_page, methods=["GET"]),
    Route("/f/confirm/{token}", confirm_post, methods=["POST"]),
    Route("/f/{id}", form_page, methods=["GET"]),
    Route("/f/{id}", signup, methods=["POST"]),
    Route("/p/{token}", preferences_page, methods=["GET"]),
    Route("/p/{token}", preferences_save, methods=["POST"]),
    Route("/v/{token}", web_view, methods=["GET"]),
    Route("/a/{slug}", archive_page, methods=["GET"]),
    Route("/a/{slug}/{id}", archive_message, methods=["GET"]),
]
