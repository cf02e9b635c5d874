"""One account's bomb templates against another account's broadcast and API calls (issue 23).

    python -m bench.bombs [--recipients 50] [--rounds 3] [--timeout 120]

Starts one `pgcast worker` (null provider) and one `pgcast api` on a fresh database (on
DATABASE_URL's server, else an embedded Postgres). Each round is a pair, back to back:
  alone  the calm account's broadcast of --recipients (a merge-tag template) is sent and
         timed until `sent`, while the calm account POSTs /broadcasts in a loop;
  bombs  the same, while the bomber account has the issue's three bomb templates (stored
         as older rows would be, then sent to 1 recipient each) and 7 parallel previews of
         each in flight.
Figures: the drain ratio bombs/alone (median of the pairs; aim <= 2), the calm account's
POST /broadcasts p99 during the bomb phases (aim < 500 ms), and the peak RSS of the worker
and the API (each parent, and its largest child: a render process) over the whole run (aim
< 300 MB). A request or drain that does not finish within --timeout counts as --timeout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import httpx
import psutil

from bench import common
from pgcast.api import auth, config
from tests.unit.test_render_budget import DOUBLING, MACRO, SQUARES

SECRET = "bench-secret-0123456789-abcdefghijklmnop"
CALM, BOMBER = "calm", "bomber"
CALM_TEXT = "Hello {{ contact.name | default('friend', true) }}, {{ unsubscribe_url }}"
PREVIEWS = 7  # parallel previews of each bomb
AIM_RATIO, AIM_P99, AIM_RSS = 2.0, 0.5, 300 << 20


class Peaks:
    """Peak RSS of some processes and of their children, sampled in a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                try:
                    proc = psutil.Process(pid)
                    own = proc.memory_info().rss
                    kids = max((c.memory_info().rss for c in proc.children(recursive=True)),
                               default=0)
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), own)
                self.peaks[f"{name} child"] = max(self.peaks.get(f"{name} child", 0), kids)

    def stop(self) -> dict[str, int]:
        """Stop sampling; the peaks in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peaks


def seed(url: str, recipients: int) -> None:
    """The calm account's contacts and the bomber's one contact."""
    with common.connect(url) as conn:
        conn.execute("INSERT INTO contacts (account, email, name) SELECT %s, 'c' || g || "
                     "'@calm.example', 'Calm ' || g FROM generate_series(1, %s) g",
                     (CALM, recipients))
        conn.execute("INSERT INTO contacts (account, email, name) "
                     "VALUES (%s, 'b@bomber.example', 'Bomb')", (BOMBER,))


def stored(url: str, account: str, text: str) -> uuid.UUID:
    """A draft whose text was stored before any check saw it (as older rows were)."""
    from pgcast.sql import broadcasts

    with common.connect(url) as conn:
        row = broadcasts.create(conn, account, subject="Hi", from_address="n@example.com",
                                text="placeholder")
        conn.execute("UPDATE broadcasts SET text_body = %s WHERE id = %s", (text, row["id"]))
        return uuid.UUID(str(row["id"]))


def send(url: str, account: str, bid: uuid.UUID) -> None:
    """Snapshot and start sending."""
    from pgcast.sql import broadcasts

    with common.connect(url) as conn:
        assert broadcasts.send(conn, account, bid)["success"]


def drain_seconds(url: str, bid: uuid.UUID, timeout: float) -> float:
    """Send the calm broadcast and time it until `sent` (timeout when it never is)."""
    started = time.perf_counter()
    send(url, CALM, bid)
    with common.connect(url) as conn:
        while time.perf_counter() - started < timeout:
            row = conn.execute("SELECT status FROM broadcasts WHERE id = %s", (bid,)).fetchone()
            if row and row["status"] == "sent":
                return time.perf_counter() - started
            time.sleep(common.POLL)
    return timeout


def creates(base: str, token: str, stop: threading.Event, timeout: float) -> list[float]:
    """The calm account's POST /broadcasts, one after another until `stop`: seconds each."""
    took: list[float] = []
    body = {"subject": "Hi", "from": "n@example.com", "text": CALM_TEXT}
    with httpx.Client(base_url=base, timeout=timeout,
                      headers={"Authorization": f"Bearer {token}"}) as c:
        while not stop.is_set() or not took:
            t0 = time.perf_counter()
            try:
                answer = c.post("/broadcasts", json=body)
                assert answer.status_code == 201, answer.text
                took.append(time.perf_counter() - t0)
                if took[-1] > 0.3:
                    print(f"  slow POST: {took[-1]:.2f} s, {len(took)}th, at {t0:.2f}",
                          flush=True)
            except httpx.TimeoutException:
                took.append(timeout)
    return took


def preview(base: str, token: str, bid: uuid.UUID, timeout: float) -> float:
    """One preview of a bomb: seconds to its answer (whatever it says)."""
    t0 = time.perf_counter()
    try:
        with httpx.Client(base_url=base, timeout=timeout,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            c.get(f"/broadcasts/{bid}/preview")
    except httpx.TimeoutException:
        return timeout
    return time.perf_counter() - t0


def one_phase(url: str, base: str, tokens: dict[str, str], recipients: int, bombs: bool,
              timeout: float, threads: concurrent.futures.Executor) -> tuple[float, list[float]]:
    """One phase: (the calm drain's seconds, the calm creates' seconds)."""
    calm = stored(url, CALM, CALM_TEXT)
    stop = threading.Event()
    posting = threads.submit(creates, base, tokens[CALM], stop, timeout)
    previews: list[concurrent.futures.Future[float]] = []
    if bombs:
        for text in (MACRO, SQUARES, DOUBLING):
            bid = stored(url, BOMBER, text)
            previews += [threads.submit(preview, base, tokens[BOMBER], bid, timeout)
                         for _ in range(PREVIEWS)]
            send(url, BOMBER, bid)
    seconds = drain_seconds(url, calm, timeout)
    stop.set()
    for p in previews:
        p.result()
    return seconds, posting.result()


def api_up(base: str) -> bool:
    """Whether /healthz answers."""
    try:
        urllib.request.urlopen(f"{base}/healthz", timeout=1).close()
        return True
    except OSError:
        return False


def run(url: str, args: argparse.Namespace) -> list[common.Figure]:
    """Start the processes, run the pairs, stop everything by pid."""
    seed(url, args.recipients)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = common.child_env(url, PGCAST_JWT_SECRET=SECRET)
    api = subprocess.Popen([sys.executable, "-m", "pgcast.bin.cli", "api", "--port", str(port)],
                           cwd=common.ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    settings = config.from_env({"PGCAST_JWT_SECRET": SECRET})
    tokens = {a: auth.make_token(settings, a, "bench") for a in (CALM, BOMBER)}
    workers = common.Workers(url, 1, ["--concurrency", "4"])
    try:
        deadline = time.monotonic() + 60
        while not api_up(base):
            if api.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pgcast api did not start")
            time.sleep(0.1)
        (worker,) = workers.start()
        peaks = Peaks({"worker": worker, "api": api.pid})
        pairs: list[tuple[float, float]] = []
        posts: list[float] = []
        calm_posts: list[float] = []  # the control: the same requests without the bombs
        with concurrent.futures.ThreadPoolExecutor(4 + 3 * PREVIEWS) as threads:
            # warm up (not counted): processes started, the picker and the pools primed
            one_phase(url, base, tokens, args.recipients, False, args.timeout, threads)
            for _ in range(args.rounds):
                alone, quiet = one_phase(url, base, tokens, args.recipients, False,
                                         args.timeout, threads)
                calm_posts += quiet
                bombed, took = one_phase(url, base, tokens, args.recipients, True,
                                         args.timeout, threads)
                pairs.append((alone, bombed))
                posts += took
                print(f"pair: alone {alone:.2f} s, with bombs {bombed:.2f} s "
                      f"({bombed / alone:.2f}x); POST /broadcasts p99 "
                      f"{common.percentile(took, 99) * 1000:.0f} ms", flush=True)
        rss = peaks.stop()
    finally:
        workers.stop()
        if api.poll() is None:
            api.terminate()
            try:
                api.wait(timeout=30)
            except subprocess.TimeoutExpired:
                api.kill()
                api.wait()
    ratios = [b / a for a, b in pairs]
    ratio = common.median(ratios)
    of_medians = common.median([b for _, b in pairs]) / common.median([a for a, _ in pairs])
    p99 = common.percentile(posts, 99)
    cmd = common.command("bombs", "--recipients", str(args.recipients),
                         "--rounds", str(args.rounds))
    figures = [
        common.Figure("bombs_drain", f"calm {args.recipients}-recipient drain with the bombs / "
                      "alone (median of pairs)", ratio, "x", aim=f"<= {AIM_RATIO}",
                      passed=ratio <= AIM_RATIO, command=cmd,
                      note=f"pairs {', '.join(f'{a:.2f}/{b:.2f} s' for a, b in pairs)}; "
                           f"ratio of the medians {of_medians:.2f}"),
        common.Figure("bombs_post_p99", "calm POST /broadcasts p99 during the bombs",
                      p99 * 1000, "ms", aim=f"< {AIM_P99 * 1000:.0f}", passed=p99 < AIM_P99,
                      command=cmd, note=f"{len(posts)} requests, median "
                                        f"{common.median(posts) * 1000:.0f} ms; without the "
                                        f"bombs p99 {common.percentile(calm_posts, 99) * 1000:.0f}"
                                        f" ms, median {common.median(calm_posts) * 1000:.0f} ms"),
    ]
    for name in ("worker", "worker child", "api", "api child"):
        peak = rss.get(name, 0)
        figures.append(common.Figure(f"bombs_rss_{name.replace(' ', '_')}",
                                     f"peak RSS: {name}", peak / (1 << 20), "MB",
                                     aim="< 300", passed=peak < AIM_RSS, command=cmd))
    return figures


def main(argv: list[str] | None = None) -> None:
    """Measure and report."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipients", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds: counted as done")
    args = p.parse_args(argv)
    with common.bench_db("bombs", None) as url:
        figures = run(url, args)
    common.report(figures, figures[0].command or "")


if __name__ == "__main__":
    main()
