"""A live progress bar for `pgcast broadcast status --watch`."""

from __future__ import annotations

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
    done = total - int(p["pending"])
    filled = WIDTH if total == 0 else int(WIDTH * done / total)
    # an ETA only while sending: a paused broadcast has none (the API says eta_seconds null)
    eta = f"{int(p['pending'] / rate)}s" if rate > 0 and p["status"] == "sending" else "-"
    return (f"[{'#' * filled}{'-' * (WIDTH - filled)}] {p['sent']}/{total} sent  "
            f"{p['skipped']} skipped  {p['failed']} failed  {rate:,.0f}/s  ETA {eta}  "
            f"{p['status']}")


def watch(read: Callable[[], dict[str, Any]], every: float = 0.25) -> dict[str, Any]:
    """Redraw until the broadcast is terminal; return the last progress row."""
    tty = sys.stdout.isatty()
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
