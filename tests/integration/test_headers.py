"""Headers are safe whatever is stored: the `file` provider's .eml and the SES request body.

The SES request is captured from a real HTTP endpoint that real boto3 talks to (no mock of
boto3): each test reads back what a mail reader, or SES, would read.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest

from pgcast.worker import providers, render, ses

BROADCAST_FROM = '"Acme News" <news@example.com>'
CONTACT = "bob@example.com"
# what tenants stored before the input checks (or wrote with direct SQL)
HOSTILE_NAMES = [
    "é <attacker@evil.com>,",
    "Bob\r\nBcc: evil@example.com",
    "Bob\nCc: evil@example.com",
    "=?utf-8?q?a=22_=3Cevil=40evil.com=3E=2C?=",
    '"Mallory" <mallory@evil.com>, x',
    "Jürgen \u2028Bcc: evil@example.com",
    "a" * 300 + " <evil@evil.com>",
]
HOSTILE_SUBJECTS = [
    "=?utf-8?q?Hello=0D=0ABcc=3A_evil=40evil.com?=",
    "Hello\r\nBcc: evil@example.com",
    "Sale \u2028Bcc: evil@example.com",
    "=?utf-8?b?SGVsbG8NCkJjYzogZXZpbEBldmlsLmNvbQ==?=",
]


def content(subject: str = "Hello", text: str | None = "Hi there",
            html: str | None = None) -> render.Content:
    return render.Content(str(uuid.uuid4()), "default", subject, BROADCAST_FROM, text, html)


def eml(tmp_path: Path, message: render.Message) -> tuple[bytes, email.message.EmailMessage]:
    provider = providers.FileProvider(tmp_path)
    provider.send(message)
    (path,) = list(tmp_path.rglob("*.eml"))
    raw = path.read_bytes()
    path.unlink()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return raw, parsed


def assert_safe(parsed: email.message.EmailMessage, to_address: str) -> None:
    """Exactly one To whose address is the contact's, no Cc/Bcc, the broadcast's From."""
    tos = parsed.get_all("To") or []
    assert len(tos) == 1
    assert [a.addr_spec for a in tos[0].addresses] == [to_address]
    assert parsed.get_all("Cc") is None and parsed.get_all("Bcc") is None
    froms = parsed.get_all("From") or []
    assert len(froms) == 1
    assert [(a.display_name, a.addr_spec) for a in froms[0].addresses] == [
        ("Acme News", "news@example.com")]
    assert not parsed.defects


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_stored_display_name_never_becomes_header_syntax(tmp_path: Path, name: str) -> None:
    message = render.render(content(), 7, CONTACT, name)
    raw, parsed = eml(tmp_path, message)
    assert_safe(parsed, CONTACT)
    head = raw.split(b"\r\n\r\n")[0]
    assert not any(line.lower().startswith((b"bcc", b"cc")) for line in head.split(b"\r\n"))


@pytest.mark.parametrize("subject", HOSTILE_SUBJECTS)
def test_a_stored_subject_is_data_and_encoded_words_are_never_decoded_into_headers(
        tmp_path: Path, subject: str) -> None:
    message = render.render(content(subject=subject), 7, CONTACT, "Bob")
    raw, parsed = eml(tmp_path, message)
    assert_safe(parsed, CONTACT)
    head = raw.split(b"\r\n\r\n")[0]
    assert not any(line.lower().startswith((b"bcc", b"cc")) for line in head.split(b"\r\n"))
    # what a reader shows is the text that was stored, on one line
    shown = str(parsed["Subject"])
    assert "\r" not in shown and "\n" not in shown
    if subject.startswith("=?"):
        assert shown == subject


def test_long_stored_names_and_subjects_keep_header_lines_short(tmp_path: Path) -> None:
    message = render.render(content(subject="s" * 3000), 7, CONTACT, "n" * 5000)
    raw, parsed = eml(tmp_path, message)
    assert_safe(parsed, CONTACT)
    head = raw.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    assert str(parsed["Subject"]) == "s" * 3000
    # (Python's address parser keeps the folding space between adjacent encoded words, which
    # RFC 2047 says a reader drops)
    assert parsed["To"].addresses[0].display_name.replace(" ", "") == "n" * 5000


def test_eml_is_written_with_crlf_line_endings(tmp_path: Path) -> None:
    raw, _ = eml(tmp_path, render.render(content(text="one\ntwo\r\nthree\n",
                                                 html="<p>four</p>\n<p>five</p>"),
                                         7, CONTACT, "Bob"))
    assert raw.count(b"\n") == raw.count(b"\r\n") > 10
    assert b"\r\r" not in raw


def test_non_ascii_names_and_subjects_are_rfc2047_and_idna_domains_punycode(
        tmp_path: Path) -> None:
    message = render.render(content(subject="Grüße, {{ contact.name }} ✉"), 7,
                            "jurgen@bücher.example", "Jürgen Groß")
    raw, parsed = eml(tmp_path, message)
    head = raw.split(b"\r\n\r\n")[0]
    assert head.isascii()  # no 8-bit header: encoded words
    assert b"=?utf-8?" in head
    assert str(parsed["Subject"]) == "Grüße, Jürgen Groß ✉"
    (to,) = parsed["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Jürgen Groß", "jurgen@xn--bcher-kva.example")


def test_the_eml_carries_one_click_unsubscribe_headers(tmp_path: Path) -> None:
    _, parsed = eml(tmp_path, render.render(content(), 7, CONTACT, "Bob"))
    link = str(parsed["List-Unsubscribe"])
    assert link.startswith("<http://127.0.0.1:8080/u/") and link.endswith(">")
    assert str(parsed["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"


# -- SES: the request body boto3 sends, captured by a real HTTP endpoint ------------------


class _Capture(http.server.BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length") or 0)
        self.bodies.append({"path": self.path, "body": json.loads(self.rfile.read(length))})
        answer = json.dumps({"MessageId": f"captured-{len(self.bodies)}"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def capturing_ses() -> Iterator[tuple[ses.SesProvider, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []
    handler = type("Handler", (_Capture,), {"bodies": bodies})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = boto3.session.Session().client(
            "sesv2", region_name="us-east-1", aws_access_key_id="test",
            aws_secret_access_key="test",
            endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
            config=botocore.config.Config(retries={"total_max_attempts": 1}))
        yield ses.SesProvider(client), bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _one_address(value: str) -> tuple[str, str]:
    header = email.policy.default.header_factory("To", value)
    addresses = list(getattr(header, "addresses", []))
    assert len(addresses) == 1 and not getattr(header, "defects", [])
    return addresses[0].display_name, addresses[0].addr_spec


@pytest.mark.parametrize("name", HOSTILE_NAMES + ["Jürgen"])
def test_the_ses_request_has_one_to_the_from_and_one_click_headers(name: str) -> None:
    with capturing_ses() as (provider, bodies):
        message = render.render(content(subject=HOSTILE_SUBJECTS[0]), 7,
                                "bob@bücher.example", name)
        assert provider.send(message) == "captured-1"
    (request,) = bodies
    body = request["body"]
    assert request["path"] == "/v2/email/outbound-emails"
    destination = body["Destination"]
    assert set(destination) == {"ToAddresses"}  # no Cc, no Bcc
    (to,) = destination["ToAddresses"]
    assert "\r" not in to and "\n" not in to
    assert _one_address(to)[1] == "bob@xn--bcher-kva.example"
    assert _one_address(body["FromEmailAddress"]) == ("Acme News", "news@example.com")
    simple = body["Content"]["Simple"]
    headers = {h["Name"]: h["Value"] for h in simple["Headers"]}
    assert headers["List-Unsubscribe"].startswith("<http://127.0.0.1:8080/u/")
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    # the subject that looks like encoded words reaches readers as the text it is
    subject = simple["Subject"]["Data"]
    assert "\r" not in subject and "\n" not in subject
    assert str(email.policy.default.header_factory("Subject", subject)) == HOSTILE_SUBJECTS[0]


def test_the_pacer_runs_on_the_sending_thread_right_before_each_request_leaves() -> None:
    """pace_with: the rate limit's pacer is called once per SendEmail, after boto3 built and
    signed the request and before the endpoint has it."""
    with capturing_ses() as (provider, bodies):
        seen: list[int] = []
        provider.pace_with(lambda: seen.append(len(bodies)))
        message = render.render(content(), 7, "bob@example.com", "Bob")
        provider.send(message)
        provider.send(message)
    assert seen == [0, 1] and len(bodies) == 2
