"""PGCAST_RETENTION_DAYS: `pgcast retention` as a procrastinate periodic task of the workers."""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import procrastinate

from pgcast.sql import db, retention
from pgcast.worker import errors

log = logging.getLogger("pgcast.retention")

QUEUE = "pgcast-retention"  # its own queue and worker loop: a long run never delays a sweep
CRON = "*/10 * * * *"  # every 10 minutes; a worker that starts runs the latest one it missed
DAY = 86400.0  # seconds


def days_from_env() -> float | None:
    """PGCAST_RETENTION_DAYS as a positive number of days; None when unset (no retention)."""
    raw = os.environ.get("PGCAST_RETENTION_DAYS", "").strip()
    if not raw:
        return None
    try:
        days = float(raw)
    except ValueError:
        raise errors.ConfigError(f"PGCAST_RETENTION_DAYS must be a number, not {raw!r}") from None
    if not days > 0 or days == float("inf"):
        raise errors.ConfigError(f"PGCAST_RETENTION_DAYS must be a number > 0, not {raw!r}")
    return days


def _run(url: str, days: float, stop: threading.Event) -> None:
    with db.connect(url, autocommit=True) as conn:
        report = retention.run(conn, days * DAY, stop=stop.is_set)
    if report.broadcasts:
        log.info("retention archived %d broadcasts, %d recipients in %.1fs",
                 report.broadcasts, report.recipients, report.seconds)


def register(app: procrastinate.App, url: str, days: float) -> None:
    """Add the periodic retention task to a procrastinate app."""

    # queueing_lock: one run waiting at most, however many workers defer it
    @app.periodic(cron=CRON, periodic_id="retention")
    @app.task(name="pgcast.retention", queue=QUEUE, queueing_lock="pgcast.retention")
    async def retain(timestamp: int) -> None:
        stop = threading.Event()
        try:
            await asyncio.to_thread(_run, url, days, stop)
        finally:
            stop.set()  # cancelled (the worker stops): the thread ends after this broadcast

    del retain
