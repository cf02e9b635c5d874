"""The provider interface and the `null` and `file` providers (`ses` is in worker.ses)."""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pgcast.mail import message as mail_message
from pgcast.worker import errors, render


class Provider(Protocol):
    """Hands one message to a mail system; raises a worker.errors.ProviderError subclass."""

    name: str
    blocking: bool  # True: call it off the event loop (network or disk I/O)
    # True: an exception it does not classify may come after the message left (network),
    # so the recipient is `unknown`; False: such an exception means nothing was sent
    may_have_sent_on_error: bool

    def send(self, message: render.Message) -> str:
        """Send one message; return the provider's message id."""
        ...

    def max_send_rate(self) -> float | None:
        """The account's own sending limit in emails/s, when the provider knows it."""
        ...


class NullProvider:
    """Accepts and discards everything: for benchmarks."""

    name = "null"
    blocking = False
    may_have_sent_on_error = False

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._prefix = f"null-{os.getpid()}-"  # made in the process that sends

    def send(self, message: render.Message) -> str:
        """Pretend to send."""
        return f"{self._prefix}{next(self._ids)}"

    def send_many(self, messages: Sequence[render.Message]) -> list[str]:
        """Pretend to send a group in one call (what SendBulkEmail is to ses): an id each."""
        prefix, ids = self._prefix, self._ids
        return [f"{prefix}{next(ids)}" for _ in messages]

    def bulk_max(self) -> int:
        """No limit of its own on the messages of one send_many call."""
        return sys.maxsize

    def max_send_rate(self) -> float | None:
        """No limit of its own."""
        return None


class FileProvider:
    """Writes one .eml per recipient into an outbox directory."""

    name = "file"
    blocking = True
    may_have_sent_on_error = False  # the .eml appears by one rename, the last step

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self.outbox.mkdir(parents=True, exist_ok=True)

    def send(self, message: render.Message) -> str:
        """Write the .eml atomically (temp file + rename)."""
        message_id = mail_message.make_message_id()
        test = message.headers.get("X-Pgcast-Test-Send")  # beside, never over, a real one
        # a transactional message (a test send is one too, kept beside its broadcast)
        mid = None if test else message.headers.get("X-Pgcast-Message")
        folder = self.outbox / ("messages" if mid else
                                message.headers.get("X-Pgcast-Broadcast", "adhoc"))
        try:
            folder.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(mail_message.to_rfc5322(message, message_id))
            name = (f"{mid}.eml" if mid else f"test-{test}.eml" if test
                    else f"{message.contact_id}.eml")
            os.replace(tmp, folder / name)
        except OSError as exc:
            raise errors.Transient(f"outbox write failed: {exc}") from exc
        return message_id

    def max_send_rate(self) -> float | None:
        """No limit of its own."""
        return None


def from_env(max_in_flight: int = 10) -> Provider:
    """The provider named by PGCAST_PROVIDER (null, file, ses; default file), able to take
    `max_in_flight` calls at once."""
    name = os.environ.get("PGCAST_PROVIDER", "file").strip().lower()
    if name == "null":
        return NullProvider()
    if name == "file":
        outbox = os.environ.get("PGCAST_OUTBOX_DIR")
        if outbox:
            return FileProvider(Path(outbox))
        from pgcast.sql import embedded

        return FileProvider(embedded.home() / "outbox")
    if name == "ses":
        from pgcast.worker import ses

        return ses.SesProvider.from_env(max_in_flight)
    raise errors.ConfigError(f"PGCAST_PROVIDER must be null, file or ses, not {name!r}")
