"""The public pages' HTML and headers: one small style allowed by its hash, nothing that runs,
nothing loaded from anywhere, readable on a phone. Every value is escaped (html.escape)."""

from __future__ import annotations

import base64
import hashlib
import html
import urllib.parse

from starlette.responses import HTMLResponse, Response

STYLE = ("body{font-family:system-ui,sans-serif;max-width:32rem;margin:2rem auto;"
         "padding:0 1rem;line-height:1.5}\n"
         "label{display:block;margin:.8rem 0 .2rem}\n"
         "input[type=email],input[type=text]{width:100%;box-sizing:border-box;font-size:1rem;"
         "padding:.5rem}\n"
         "button{font-size:1rem;padding:.6rem 1.2rem;margin:.8rem .5rem 0 0}\n"
         ".hp{position:absolute;left:-10000px;width:1px;height:1px;overflow:hidden}\n"
         "fieldset{border:0;padding:0;margin:0}\n"
         ".topic{display:flex;gap:.5rem;align-items:center;margin:.4rem 0}\n"
         ".topic label{margin:0}")
_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()


def csp(*, frame: bool = False, form_to: str | None = None) -> str:
    """The pages' policy: nothing runs or loads; forms post back here (and may redirect to
    form_to); framed by nobody unless `frame` (an embeddable form)."""
    action = "'self'" + (f" {form_to}" if form_to else "")
    ancestors = "*" if frame else "'none'"
    return (f"default-src 'none'; style-src 'sha256-{_HASH}'; form-action {action}; "
            f"base-uri 'none'; frame-ancestors {ancestors}")


# A tenant's message shown as a page (/v/, /a/): its own inline styles, nothing else; no
# script, no image or font from anywhere (no third-party request), and a sandbox: even a
# script the policy missed would run in an opaque origin.
MESSAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'none'; "
               "base-uri 'none'; frame-ancestors 'none'; "
               "sandbox allow-popups allow-popups-to-escape-sandbox "
               "allow-top-navigation-by-user-activation")


def origin(url: str) -> str:
    """scheme://host[:port] of an http(s) URL (a redirect's origin, for form-action)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def page(title: str, body: str) -> str:
    """A whole page: `body` is markup made here, every value in it escaped already."""
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<meta name=\"robots\" content=\"noindex\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style></head>\n"
            f"<body><main><h1>{html.escape(title)}</h1>\n{body}</main></body></html>\n")


def respond(content: str, status: int = 200, *, policy: str | None = None,
            frame: bool = False, headers: dict[str, str] | None = None) -> Response:
    """An HTML answer with the pages' headers (no caching, no referrer, no sniffing)."""
    out = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
           "Content-Security-Policy": policy or csp(frame=frame),
           "X-Content-Type-Options": "nosniff", **(headers or {})}
    if not frame:
        out["X-Frame-Options"] = "DENY"
    return HTMLResponse(content, status_code=status, headers=out)


def text(value: str) -> str:
    """A value as HTML text."""
    return html.escape(value, quote=True)


def signup_form(action: str, error: str = "") -> str:
    """The sign-up form: email, optional name, and a honeypot field people never see."""
    problem = f'<p role="alert">{text(error)}</p>' if error else ""
    return (f'{problem}<form method="post" action="{text(action)}">'
            '<label for="email">Email address</label>'
            '<input id="email" name="email" type="email" required maxlength="254" '
            'autocomplete="email" inputmode="email">'
            '<label for="name">Name (optional)</label>'
            '<input id="name" name="name" type="text" maxlength="200" autocomplete="name">'
            '<div class="hp" aria-hidden="true"><label for="website">Leave this empty</label>'
            '<input id="website" name="website" type="text" tabindex="-1" '
            'autocomplete="off"></div>'
            '<button type="submit">Subscribe</button></form>')


CHECK_INBOX = page("Check your inbox",
                   "<p>If this address can receive our emails, a message is on its way to it. "
                   "Open it and follow its link to confirm your subscription.</p>")
THANKS = page("Thank you", "<p>Thank you for signing up.</p>")
NO_FORM = page("Form not found", "<p>This sign-up form does not exist (any more).</p>")
TOO_FAST = page("Too many requests", "<p>Please wait a minute and try again.</p>")
BAD_REQUEST = page("Sign-up", "<p>The request was not a sign-up form.</p>")
CONFIRM = page("Confirm your subscription",
               '<p>Press the button to confirm that you want to receive our emails.</p>'
               '<form method="post"><input type="hidden" name="confirm" value="yes">'
               '<button type="submit">Confirm</button></form>')
CONFIRMED = page("You are subscribed", "<p>Thank you: your subscription is confirmed.</p>")
NOT_CONFIRMED = page("Not confirmed",
                     "<p>This subscription cannot be confirmed any more. Sign up again on the "
                     "form to get a new link.</p>")
EXPIRED = page("Link expired",
               "<p>This confirmation link is older than 7 days. Sign up again on the form to "
               "get a new one.</p>")
INVALID = page("Invalid link", "<p>This link is not valid. Use the link from the email, "
                               "whole.</p>")
NOT_FOUND = page("Not found", "<p>There is nothing here.</p>")


def preferences(topics: list[dict[str, object]], unsubscribed: bool, note: str = "") -> str:
    """The preference page: one checkbox per topic, Save, and Unsubscribe from everything."""
    boxes = "".join(
        f'<div class="topic"><input type="checkbox" id="t{i}" name="topic" '
        f'value="{text(str(t["tag"]))}"{" checked" if t["chosen"] else ""}>'
        f'<label for="t{i}">{text(str(t["label"]))}</label></div>'
        for i, t in enumerate(topics))
    status = ("<p>You are unsubscribed from everything: you receive none of our emails.</p>"
              if unsubscribed else "")
    saved = f'<p role="status">{text(note)}</p>' if note else ""
    fields = (f'<fieldset><legend>Topics you want to hear about</legend>{boxes}</fieldset>'
              if topics else "<p>There are no topics to choose from.</p>")
    return page("Your email preferences",
                f'{saved}{status}<form method="post">{fields}'
                '<button type="submit" name="action" value="save">Save</button>'
                '<button type="submit" name="action" value="unsubscribe">'
                'Unsubscribe from everything</button></form>')


def archive_list(title: str, slug: str, rows: list[tuple[str, str, str]]) -> str:
    """An account's archive: (id, subject, date) of each broadcast, newest first."""
    items = "".join(f'<li><a href="/a/{text(slug)}/{text(bid)}">{text(subject)}</a> '
                    f'<small>{text(date)}</small></li>' for bid, subject, date in rows)
    return page(title, f"<ul>{items}</ul>" if rows else "<p>Nothing here yet.</p>")


def text_message(subject: str, body: str) -> str:
    """A text-only message as a page."""
    return page(subject, f'<pre style="white-space:pre-wrap">{text(body)}</pre>')
