"""A real pgcast stack for the browser tests (and `make screenshot`): API, workers, tokens."""

from __future__ import annotations

import subprocess
from typing import Any

from tests import support
from tests.integration import test_api_helpers as h


class Stack:
    """`pgcast api` (uvicorn) on a free port; workers on demand; tokens for the account."""

    def __init__(self, db_url: str, procs: support.Processes) -> None:
        self.db_url, self.procs = db_url, procs
        self.port = support.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api = self._start_api()

    def _start_api(self) -> subprocess.Popen[str]:
        # leeway 0: an expired token is refused the moment it expires
        api = self.procs.start(self.db_url, "api", "--port", str(self.port),
                               PGCAST_JWT_SECRET=h.SECRET, PGCAST_API_EVENTS_INTERVAL="0.2",
                               PGCAST_JWT_LEEWAY="0")
        support.wait_for(lambda: h.api_up(self.base) or api.poll() is not None,
                         timeout=30, what="pgcast api")
        assert api.poll() is None, self.procs.log(api)
        return api

    def restart_api(self) -> None:
        """Stop the API (SIGTERM ends its event streams) and start a new one on the same port."""
        self.procs.stop(self.api, timeout=60)
        self.api = self._start_api()

    def workers(self, n: int, rate: int, *flags: str) -> list[subprocess.Popen[str]]:
        """n worker processes on the null provider, sharing a global rate of `rate` emails/s."""
        return [self.procs.start(self.db_url, "worker", "--concurrency", "2", *flags,
                                 PGCAST_PROVIDER="null", PGCAST_RATE=str(rate),
                                 PGCAST_BURST=str(max(1, rate // 10)))
                for _ in range(n)]

    @staticmethod
    def token(ttl: float = 600, **kw: Any) -> str:
        """A token for the test account."""
        return h.token(ttl=ttl, **kw)
