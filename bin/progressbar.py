"""A live progress bar for `pgcast broadcast status --watch`."""

from __future__ import annotations

import datetime as dt
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

TERMINAL = ("sent", "failed", "cancelled")
WIDTH = 30  # characters of bar
WINDOW = 5.0  # seconds of history the rate is measured over


def line(p: dict[str, Any], rate: float) -> str:
    """One rendering of the bar."""
    total = int(p["total"])
    # what reached an outcome: cancelled rows were never sent, so they do not fill the bar
    done = total - int(p["pending"]) - int(p.get("cancelled") or 0)
    filled = 0 if total == 0 else int(WIDTH * done / total)
    # an ETA only while sending: a paused broadcast has none (the API says eta_seconds null)
    eta = f"{int(p['pending'] / rate)}s" if rate > 0 and p["status"] == "sending" else "-"
    return (f"[{'#' * filled}{'-' * (WIDTH - filled)}] {p['sent']}/{total} sent  "
            f"{p['skipped']} skipped  {p['failed']} failed  {rate:,.0f}/s  ETA {eta}  "
            f"{p['status']}")


def waiting(p: dict[str, Any]) -> str:
    """The line for a broadcast that has not started: no bar to draw yet."""
    at: Any = p.get("scheduled_at")
    when = at.isoformat() if isinstance(at, dt.datetime) else str(at)
    return f"scheduled for {when}: waiting for it to start"


def watch(read: Callable[[], dict[str, Any]], every: float = 0.25,
          scheduled_every: float = 1.0) -> dict[str, Any]:
    """Redraw until the broadcast is terminal or paused; return the last progress row. A
    draft is returned at once (nothing will happen to it by itself); a scheduled broadcast is
    waited for."""
    tty = sys.stdout.isatty()
    said_waiting = False
    while (p := read())["status"] in ("draft", "scheduled"):
        if p["status"] == "draft":
            print("a draft: nothing to watch until it is sent or scheduled", file=sys.stderr)
            return p
        if tty:
            sys.stdout.write("\r" + waiting(p) + "\x1b[K")
            sys.stdout.flush()
        elif not said_waiting:
            print(waiting(p), flush=True)
        said_waiting = True
        time.sleep(scheduled_every)
    if tty and said_waiting:
        sys.stdout.write("\n")
    history: deque[tuple[float, int]] = deque()
    last_print = -math.inf  # never printed (monotonic() counts from boot)
    while True:
        p = read()
        now = time.monotonic()
        done = int(p["total"]) - int(p["pending"])
        history.append((now, done))
        while len(history) > 2 and now - history[0][0] > WINDOW:
            history.popleft()
        t0, d0 = history[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        final = p["status"] in TERMINAL or (p["status"] == "paused")
        if tty:
            sys.stdout.write("\r" + line(p, rate) + "\x1b[K")
            sys.stdout.flush()
        elif final or now - last_print >= 1.0:
            print(line(p, rate), flush=True)
            last_print = now
        if final:
            if tty:
                sys.stdout.write("\n")
            return p
        time.sleep(every)
