"""moto's own server (what `python -m moto.server` runs) with sesv2 SendBulkEmail added, for
the test rings: moto 5.2.6 has no SendBulkEmail.

The handler is added to moto's SESV2Response (moto dispatches a rest-json request to the
method named after its operation) with a route of its own for the operation's path
(`/v2/email/outbound-bulk-emails`: moto's `/v2/.*` catch-all does not reach it in server
mode, a plain moto answers that path 404). Each entry goes through moto's own sesv2 backend
`send_email`, so an accepted one is in `/moto-api/data.json` like a SendEmail message and an
unverified sender is refused as moto refuses SendEmail (MESSAGE_REJECTED here, per entry).
The inline template's `{{name}}` placeholders are replaced by the entry's
ReplacementTemplateData (else the default TemplateData), as SES does for simple
substitutions; a placeholder with no value is left empty and the entry is marked
`missing` (SES would report a Rendering Failure event later).

What this rig adds and real SES does not have (test-only):

- `GET /_motobulk/entries`: every entry sent so far, with what SES would have built from
  it: `to`, `from`, `subject`, `text`, `html` (substituted), `headers` (Template.Headers
  overridden by the entry's ReplacementHeaders, as SES documents), `tags`
  (DefaultEmailTags, then the entry's ReplacementTags over them), `configuration_set`,
  `status`, `message_id`, `missing`, and `call` (the number of the SendBulkEmail call).
- Fault injection per entry: `POST /_motobulk/faults` with `{"pattern": "STATUS", ...}`
  answers every entry whose To address matches the regular expression `pattern` with that
  BulkEmailEntryResult Status (not sent; Error "injected by the test"); `"STATUS:N"`: only
  the first N such entries; `{}` clears it.
- `POST /moto-api/reset` also forgets the entries and the faults.

    python -m tests.motobulk -H 127.0.0.1 -p 5000
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from typing import Any

from moto.moto_server import werkzeug_app
from moto.ses import exceptions as ses_errors
from moto.sesv2 import responses as sesv2_responses
from moto.sesv2 import urls as sesv2_urls
from werkzeug.serving import run_simple

BULK_PATH = "{0}/v2/email/outbound-bulk-emails$"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")

_lock = threading.Lock()
_entries: list[dict[str, Any]] = []
_faults: dict[str, list[Any]] = {}  # pattern -> [status, how many more (None: all)]
_calls = [0]


def _substitute(template: str | None, data: dict[str, Any], missing: list[str]) -> str | None:
    if template is None:
        return None

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in data:
            missing.append(name)
            return ""
        return str(data[name])

    return PLACEHOLDER.sub(value, template)


def _address(to: str) -> str:
    return to.rsplit("<", 1)[-1].rstrip(">").strip()


def send_bulk_email(self: Any) -> str:
    """SendBulkEmail: each entry through the sesv2 backend's send_email, results by position."""
    params = json.loads(self.body)
    source = params.get("FromEmailAddress")
    template = params.get("DefaultContent", {}).get("Template", {})
    content = template.get("TemplateContent", {})
    default_data = json.loads(template.get("TemplateData") or "{}")
    default_headers = {h["Name"]: h["Value"] for h in template.get("Headers", [])}
    default_tags = {t["Name"]: t["Value"] for t in params.get("DefaultEmailTags", [])}
    with _lock:
        _calls[0] += 1
        call = _calls[0]
    results = []
    for entry in params.get("BulkEmailEntries", []):
        destination = entry.get("Destination", {})
        to = (destination.get("ToAddresses") or [""])[0]
        raw = entry.get("ReplacementEmailContent", {}).get("ReplacementTemplate", {}).get(
            "ReplacementTemplateData")
        data = json.loads(raw) if raw else default_data
        missing: list[str] = []
        subject = _substitute(content.get("Subject"), data, missing) or ""
        text = _substitute(content.get("Text"), data, missing)
        html = _substitute(content.get("Html"), data, missing)
        headers = {**default_headers,
                   **{h["Name"]: h["Value"] for h in entry.get("ReplacementHeaders", [])}}
        tags = {**default_tags, **{t["Name"]: t["Value"] for t in entry.get("ReplacementTags",
                                                                            [])}}
        status = _fault(_address(to))
        result: dict[str, str]
        if status is not None:
            result = {"Status": status, "Error": "injected by the test"}
        else:
            try:
                message = self.sesv2_backend.send_email(
                    source=source, destinations=destination, subject=subject,
                    body=html if html is not None else (text or ""))
                result = {"Status": "SUCCESS", "MessageId": message.id}
            except ses_errors.MessageRejectedError as exc:
                result = {"Status": "MESSAGE_REJECTED", "Error": exc.message}
            except ses_errors.InvalidParameterValue as exc:
                result = {"Status": "INVALID_PARAMETER", "Error": exc.message}
        with _lock:
            _entries.append({"call": call, "to": to, "from": source, "subject": subject,
                             "text": text, "html": html, "headers": headers, "tags": tags,
                             "configuration_set": params.get("ConfigurationSetName"),
                             "status": result["Status"],
                             "message_id": result.get("MessageId"), "missing": missing})
        results.append(result)
    return json.dumps({"BulkEmailEntryResults": results})


def _fault(address: str) -> str | None:
    """The Status injected for this address, if any (counted)."""
    with _lock:
        for pattern, fault in _faults.items():
            if re.search(pattern, address) and fault[1] != 0:
                if fault[1] is not None:
                    fault[1] -= 1
                return str(fault[0])
    return None


def install() -> None:
    """Add SendBulkEmail to moto's sesv2 (before the server builds its routes)."""
    sesv2_responses.SESV2Response.send_bulk_email = send_bulk_email  # type: ignore[attr-defined]
    sesv2_urls.url_paths[BULK_PATH] = sesv2_urls.response.dispatch


class App:
    """moto's WSGI application behind the rig's own routes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path == "/_motobulk/entries" and method == "GET":
            with _lock:
                body = json.dumps(_entries).encode()
            return self._answer(start_response, body)
        if path == "/_motobulk/faults" and method == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            faults = json.loads(environ["wsgi.input"].read(length) or b"{}")
            with _lock:
                _faults.clear()
                for pattern, value in faults.items():
                    status, _, times = str(value).partition(":")
                    _faults[str(pattern)] = [status, int(times) if times else None]
            return self._answer(start_response, b"{}")
        if path == "/moto-api/reset" and method == "POST":
            with _lock:
                _entries.clear()
                _faults.clear()
                _calls[0] = 0
        return self.inner(environ, start_response)

    @staticmethod
    def _answer(start_response: Any, body: bytes) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]


def main(argv: list[str] | None = None) -> None:
    """Serve like `python -m moto.server -H HOST -p PORT`, with SendBulkEmail."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5000)
    args = parser.parse_args(argv)
    install()
    app = werkzeug_app.DomainDispatcherApplication(werkzeug_app.create_backend_app)
    app.debug = True  # type: ignore[attr-defined]
    run_simple(args.host, args.port, App(app), threaded=True,
               request_handler=werkzeug_app.MotoRequestHandler)


if __name__ == "__main__":
    main()
