"""A fault-injecting HTTP proxy in front of the SES test server, for the acceptance ring.

Workers point AWS_ENDPOINT_URL_SESV2 at it. Every sesv2 SendEmail request (POST
/v2/email/outbound-emails) is matched against the current rules; a matching rule answers
with the error shape real SES v2 uses (a rest-json error: status, `x-amzn-ErrorType`
header, `{"message": ...}` body) and the request never reaches the server. Everything
else is forwarded unchanged. Loopback only; bounded request size and upstream timeouts.

A SendBulkEmail request (POST /v2/email/outbound-bulk-emails) is matched entry by entry,
each entry as the SendEmail request of its message would be (a rule's `every`, `skip`,
`limit` and `match` count and read entries): an entry a rule answers gets the
BulkEmailEntryResult Status SES gives that refusal (MESSAGE_REJECTED, ACCOUNT_THROTTLED,
ACCOUNT_SENDING_PAUSED, ACCOUNT_DAILY_QUOTA_EXCEEDED) and is not forwarded; the others are
forwarded in one SendBulkEmail request and their results put back in place. A 5xx rule
answers the whole call. A rule that loses an answer (no_answer, dropped, answer_lost) can
only lose a whole call's: while one is set, the proxy answers SendBulkEmail 404
UnknownOperationException, so the worker falls back to one SendEmail per message and the
rule applies per message, as its tests expect. Rules made for a whole SendBulkEmail call
(bulk_throttled, bulk_answer_lost: `whole_call`) are counted per call and leave SendEmail
alone. `send_requests` counts HTTP requests (one per bulk call), `forwarded_sends` counts
messages, `injected` messages for per-message rules and calls for whole-call ones.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import ipaddress
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

SEND_EMAIL_PATH = "/v2/email/outbound-emails"
SEND_BULK_PATH = "/v2/email/outbound-bulk-emails"
MAX_BODY = 4 * 1024 * 1024  # bytes: a SendEmail request is far smaller
UPSTREAM_TIMEOUT = 30.0  # seconds
# the namespace suffix SES puts after the code in x-amzn-ErrorType (botocore strips it)
ERROR_NAMESPACE = "http://internal.amazon.com/coral/com.amazonaws.services.email/"
NO_ANSWER = 0  # a Rule status: close the connection without answering
FORWARD_NO_ANSWER = -1  # a Rule status: forward the request, then close without answering


@dataclass
class Rule:
    """Answer some SendEmail requests with one SES error instead of forwarding them."""

    status: int
    code: str
    message: str
    every: int = 1  # answer every Nth matching request (1 = all of them)
    skip: int = 0  # let the first `skip` matching requests through first
    limit: int | None = None  # answer at most this many, then forward again
    match: str | None = None  # only requests whose body contains this text
    once_each: bool = False  # never answer two requests to the same destination
    delay: float = 0.0  # seconds the answer is held back (the request was read at once)
    # a rule for SendBulkEmail calls as a whole (counted per call, never per entry; it
    # ignores SendEmail requests): a throttle or a lost answer of the whole call
    whole_call: bool = False
    seen: int = 0  # matching requests so far
    hit: set[str] = field(default_factory=set)  # destinations answered (once_each)
    answered: int = 0  # requests this rule answered


# Error shapes of the real SES v2 API (SendEmail), by what they mean to pgcast.
def bulk_throttled(limit: int = 1) -> Rule:
    """429 TooManyRequestsException for a whole SendBulkEmail call (the first `limit`)."""
    return Rule(429, "TooManyRequestsException", "Maximum sending rate exceeded.",
                limit=limit, whole_call=True)


def bulk_answer_lost(limit: int = 1, skip: int = 0, delay: float = 0.0) -> Rule:
    """A whole SendBulkEmail call forwarded (SES takes every entry), its answer held `delay`
    seconds and then lost (the connection closes): the first `limit` calls after `skip`."""
    return Rule(FORWARD_NO_ANSWER, "", "", limit=limit, skip=skip, delay=delay,
                whole_call=True)


def throttled(every: int = 5) -> Rule:
    """429 TooManyRequestsException, the sending-rate throttle."""
    return Rule(429, "TooManyRequestsException", "Maximum sending rate exceeded.", every=every)


def rejected(address: str) -> Rule:
    """400 MessageRejected for one recipient address."""
    return Rule(400, "MessageRejected", "Email address is on the suppression list.",
                match=f"<{address}>")  # To is `Name <address>`


def no_answer(address: str) -> Rule:
    """The connection closed with no answer, for one recipient: the outcome is unknown."""
    return Rule(NO_ANSWER, "", "", match=f"<{address}>")


def dropped(every: int, limit: int | None = None, once_each: bool = False) -> Rule:
    """Every Nth request read and never forwarded nor answered (the connection closes);
    once_each: a destination's later requests (a requeued send) always go through."""
    return Rule(NO_ANSWER, "", "", every=every, limit=limit, once_each=once_each)


def answer_lost(every: int, limit: int | None = None) -> Rule:
    """Every Nth request forwarded (SES takes it), then its answer lost (the connection
    closes): the sender cannot tell, SES's events can."""
    return Rule(FORWARD_NO_ANSWER, "", "", every=every, limit=limit)


def sending_paused(skip: int = 0, delay: float = 0.0) -> Rule:
    """400 SendingPausedException for every request after the first `skip`, each answered
    `delay` seconds after it was read."""
    return Rule(400, "SendingPausedException",
                "Sending is paused for this account.", skip=skip, delay=delay)


def daily_quota(skip: int = 0) -> Rule:
    """429 TooManyRequestsException carrying the daily-quota message (not a rate throttle)."""
    return Rule(429, "TooManyRequestsException", "Daily message quota exceeded.", skip=skip)


def server_error(status: int = 500) -> Rule:
    """A 5xx InternalFailure on every request."""
    return Rule(status, "InternalFailure", "An internal error occurred.")


def entry_status(rule: Rule) -> str:
    """The BulkEmailEntryResult Status SES gives an entry for the refusal a rule answers."""
    if rule.status == 429:
        return ("ACCOUNT_DAILY_QUOTA_EXCEEDED" if "daily" in rule.message.lower()
                else "ACCOUNT_THROTTLED")
    return {"MessageRejected": "MESSAGE_REJECTED",
            "SendingPausedException": "ACCOUNT_SENDING_PAUSED",
            "AccountSuspendedException": "ACCOUNT_SUSPENDED"}.get(rule.code, "FAILED")


def _destination(text: str) -> str:
    """The To addresses of a SendEmail body (JSON), as one key."""
    try:
        return ",".join(json.loads(text)["Destination"]["ToAddresses"])
    except (ValueError, KeyError, TypeError):
        return text


class FaultProxy:
    """The proxy server, serving from a daemon thread until close()."""

    def __init__(self, upstream: str) -> None:
        target = urllib.parse.urlsplit(upstream)
        host = target.hostname or ""
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the fault proxy only forwards to loopback, not {host!r}")
        self.upstream_host = host
        self.upstream_port = int(target.port or 80)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self.send_requests = 0  # SendEmail requests received
        self.forwarded_sends = 0  # SendEmail requests forwarded upstream
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="faultproxy", daemon=True)
        self._thread.start()

    def set_rules(self, *rules: Rule) -> None:
        """Replace the rules (none: forward everything)."""
        with self._lock:
            self._rules = list(rules)

    @property
    def injected(self) -> int:
        """How many messages (SendEmail requests, SendBulkEmail entries) the rules answered."""
        with self._lock:
            return sum(r.answered for r in self._rules)

    def decide(self, path: str, body: bytes) -> Rule | None:
        """The rule that answers this request, if any (counts it)."""
        if path.split("?")[0].rstrip("/") != SEND_EMAIL_PATH:
            return None
        text = body.decode("utf-8", "replace")
        with self._lock:
            self.send_requests += 1
            rule = self._decide(text)
            if rule is None:
                self.forwarded_sends += 1
            return rule

    def loses_answers(self) -> bool:
        """A rule that loses one message's answer is set (SendBulkEmail is then not served)."""
        with self._lock:
            return any(r.status in (NO_ANSWER, FORWARD_NO_ANSWER) and not r.whole_call
                       for r in self._rules)

    def decide_bulk(self, entries: list[Any]) -> tuple[Rule | None, list[Rule | None]]:
        """The whole-call rule that answers a SendBulkEmail request, else the rule that
        answers each of its entries, if any (counts them)."""
        with self._lock:
            self.send_requests += 1
            for rule in self._rules:
                if not rule.whole_call or (rule.limit is not None
                                           and rule.answered >= rule.limit):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip or (rule.seen - rule.skip) % rule.every != 0:
                    continue
                rule.answered += 1
                return rule, [None] * len(entries)
            # each entry read as its message's own SendEmail request would be
            return None, [self._decide(json.dumps(e)) for e in entries]

    def _decide(self, text: str) -> Rule | None:
        """The rule that answers one message's request (under self._lock; counts it)."""
        for rule in self._rules:
            if rule.whole_call:
                continue
            if rule.match is not None and rule.match not in text:
                continue
            if rule.limit is not None and rule.answered >= rule.limit:
                continue
            to = _destination(text) if rule.once_each else ""
            if to in rule.hit:
                continue
            rule.seen += 1
            if rule.seen <= rule.skip or (rule.seen - rule.skip) % rule.every != 0:
                continue
            rule.answered += 1
            if rule.once_each:
                rule.hit.add(to)
            return rule
        return None

    def env(self) -> dict[str, str]:
        """What a worker needs to send its sesv2 calls through the proxy."""
        return {"AWS_ENDPOINT_URL_SESV2": self.url}

    def close(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


def _handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        """Answers from a rule or forwards; keep-alive like a real endpoint."""

        protocol_version = "HTTP/1.1"
        timeout = 60  # seconds an idle keep-alive connection may stay open

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Quiet: pytest would show it as noise."""

        def _body(self) -> bytes | None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._reply(413, {"Content-Type": "text/plain"}, b"request too large")
                return None
            return self.rfile.read(length) if length else b""

        def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, body: bytes, answer: bool = True) -> None:
            upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                                  timeout=UPSTREAM_TIMEOUT)
            try:
                skip = {"host", "content-length", "connection", "transfer-encoding"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
                passed = {k: v for k, v in reply.getheaders()
                          if k.lower() not in skip and k.lower() != "keep-alive"}
                if answer:
                    self._reply(reply.status, passed, data)
            finally:
                upstream.close()

        def _bulk(self, body: bytes) -> None:
            if proxy.loses_answers():
                self._reply(404, {"Content-Type": "application/json",
                                  "x-amzn-RequestId": str(uuid.uuid4()),
                                  "x-amzn-ErrorType": "UnknownOperationException"},
                            b'{"message": "not served while answers are lost"}')
                return
            request = json.loads(body)
            entries = list(request.get("BulkEmailEntries", []))
            call, rules = proxy.decide_bulk(entries)
            if call is not None and call.status == FORWARD_NO_ANSWER:
                with proxy._lock:
                    proxy.forwarded_sends += len(entries)
                self._upstream(body)
                time.sleep(call.delay)
                self.close_connection = True
                return
            whole = call or next((r for r in rules if r is not None and r.status >= 500), None)
            held = max((r.delay for r in [call, *rules] if r is not None), default=0.0)
            if held > 0:
                time.sleep(held)
            if whole is not None:
                self._reply(whole.status, {
                    "Content-Type": "application/json",
                    "x-amzn-RequestId": str(uuid.uuid4()),
                    "x-amzn-ErrorType": f"{whole.code}:{ERROR_NAMESPACE}",
                }, json.dumps({"message": whole.message}).encode())
                return
            results: list[Any] = [None if r is None else
                                  {"Status": entry_status(r), "Error": r.message}
                                  for r in rules]
            passed = [e for e, r in zip(entries, rules, strict=True) if r is None]
            if passed:
                with proxy._lock:
                    proxy.forwarded_sends += len(passed)
                status, headers, data = self._upstream(json.dumps(
                    {**request, "BulkEmailEntries": passed}).encode())
                if status != 200:
                    self._reply(status, headers, data)
                    return
                answered = iter(json.loads(data)["BulkEmailEntryResults"])
                results = [next(answered) if r is None else r for r in results]
            self._reply(200, {"Content-Type": "application/json",
                              "x-amzn-RequestId": str(uuid.uuid4())},
                        json.dumps({"BulkEmailEntryResults": results}).encode())

        def _upstream(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
            upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                                  timeout=UPSTREAM_TIMEOUT)
            try:
                skip = {"host", "content-length", "connection", "transfer-encoding"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                upstream.request(self.command, self.path, body=body, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
                passed = {k: v for k, v in reply.getheaders()
                          if k.lower() not in skip and k.lower() != "keep-alive"}
                return reply.status, passed, data
            finally:
                upstream.close()

        def _handle(self) -> None:
            body = self._body()
            if body is None:
                return
            if self.command == "POST" and self.path.split("?")[0].rstrip("/") == SEND_BULK_PATH:
                self._bulk(body)
                return
            rule = proxy.decide(self.path, body)
            if rule is None:
                self._forward(body)
                return
            if rule.status == FORWARD_NO_ANSWER:
                with proxy._lock:
                    proxy.forwarded_sends += 1
                self._forward(body, answer=False)
                self.close_connection = True
                return
            if rule.delay > 0:
                time.sleep(rule.delay)  # this connection's own thread: the others go on
            if rule.status == NO_ANSWER:
                # the request was read, and nobody will ever say what became of it
                self.close_connection = True
                return
            self._reply(rule.status, {
                "Content-Type": "application/json",
                "x-amzn-RequestId": str(uuid.uuid4()),
                "x-amzn-ErrorType": f"{rule.code}:{ERROR_NAMESPACE}",
            }, json.dumps({"message": rule.message}).encode())

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    return Handler


@contextlib.contextmanager
def running(upstream: str) -> Iterator[FaultProxy]:
    """A proxy in front of `upstream` for the duration of the block."""
    proxy = FaultProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()
