"""api.sns.https_get never follows a redirect (it could lead off the checked host)."""

from __future__ import annotations

import http.server
import threading
import urllib.error

import pytest

from pgcast.api import sns


class _Redirect(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(302)
        self.send_header("Location", "http://127.0.0.1:9/evil.pem")
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_redirect_is_not_followed() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            sns.https_get(f"http://127.0.0.1:{server.server_port}/cert.pem")
        assert caught.value.code == 302
    finally:
        server.shutdown()
        server.server_close()
