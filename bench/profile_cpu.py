"""Where a ses worker's CPU per delivered message goes: py-spy on one worker (issue 32's profile).

One `pgcast worker` (default flags, PGCAST_PROVIDER=ses through real boto3, no rate limit)
drains a broadcast against bench.sesd answering each SendEmail or SendBulkEmail call in
`--latency-ms` (the worker sends by SendBulkEmail; `--send-email`: PGCAST_SES_BULK=0, one
SendEmail per message as before issue 32's second half). Two drains
of the same size, same run: the first without py-spy (the worker's CPU per delivered message,
user + system, as bench.provider measures it), the second under `py-spy record --gil
--nonblocking` (only samples where a thread holds the GIL: Python's own CPU; C work that
releases the GIL, like the socket writes, is not in them). Each sample is put in the first
bucket that one of its frames matches, from the innermost frame outwards, so a SigV4 hash
called from botocore's event hooks counts as signing, not as hooks.

    .venv/bin/python -m bench.profile_cpu --recipients 6000 --latency-ms 20
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import psycopg
from psycopg.rows import dict_row

from bench import common, provider, ratelimit, sesd

# (bucket, substrings of a frame's "function (file:line)"), innermost match wins
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("boto3: SigV4 signing", ("botocore/auth.py", "botocore/credentials.py",
                              "botocore/signers.py")),
    ("boto3: parameter validation", ("botocore/validate.py",)),
    ("boto3: serialise request", ("botocore/serialize.py",)),
    ("boto3: parse response", ("botocore/parsers.py",)),
    ("boto3: user-agent string", ("botocore/useragent.py",)),
    ("boto3: endpoint rules", ("botocore/regions.py", "botocore/endpoint_provider.py")),
    ("boto3: event hooks and handlers", ("botocore/hooks.py", "botocore/handlers.py")),
    ("boto3: HTTP transport (urllib3, http.client, awsrequest, socket, sesconn)",
     ("urllib3/", "http/client.py", "botocore/awsrequest.py", "botocore/httpsession.py",
      "(socket.py", "(email/", "(worker/sesconn.py")),
    ("boto3: rest of botocore/boto3 (client, endpoint loop, retries context, uuid4)",
     ("botocore/", "boto3/")),
    ("rendering (worker/render, mail/, jinja2)", ("(worker/render.py", "(mail/", "jinja2/",
                                                 "markupsafe/")),
    ("psycopg (claims, records, control)", ("psycopg/", "psycopg_pool/", "psycopg_c")),
    ("pgcast worker, other (engine, dispatch, recorder, ratelimit)", ("(worker/",)),
    ("asyncio (the worker's event loop: wake-ups from the send threads)", ("asyncio/",)),
    ("threads, futures, queues, logging, other stdlib", ("threading.py", "queue.py",
                                                         "concurrent/", "logging/",
                                                         "selectors.py")),
]
# SesProvider.send / send_many: the whole provider call
PROVIDER_CALL = ("send (worker/ses.py", "send_many (worker/ses.py")


def bucket(frames: list[str]) -> str:
    """The bucket of one stack (frames from the outermost to the innermost)."""
    for frame in reversed(frames):
        for name, needles in BUCKETS:
            if any(n in frame for n in needles):
                return name
    return "other"


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: one `frame;frame;... count` per line."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def cpu_split(pid: int) -> tuple[float, float, float]:
    """(user, system) CPU seconds of a process, and the user + system of its children (the
    render processes of mail.renderpool) so far."""
    proc = psutil.Process(pid)
    t = proc.cpu_times()
    kids = 0.0
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:
            continue
        kids += c.user + c.system
    return t.user, t.system, kids


@dataclass
class Drained:
    """One drain's CPU, per delivered message, in ms."""

    n: int
    seconds: float
    user: float
    system: float
    render_procs: float
    groups: int  # claims (claim tokens) the recipients were sent in

    @property
    def worker(self) -> float:
        """The worker process's own CPU per message (what bench.provider reports)."""
        return self.user + self.system


def drain(url: str, env: dict[str, str], n: int, logs: Path, label: str,
          spy: Path | None, rate: int) -> Drained:
    """One worker, one broadcast of n recipients."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        provider._seed(conn, n)
        procs = provider._start(url, env, 1, logs, label, [])
        spy_proc = None
        try:
            ratelimit._wait(lambda: ratelimit._listeners(conn) >= 1, 60, "the worker to start")
            time.sleep(1.0)  # imports and first polls are not the sending's CPU
            if spy is not None:
                spy_proc = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "--gil",
                     "--nonblocking", "--rate", str(rate), "--format", "raw", "--output",
                     str(spy), "--pid", str(procs[0].pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(1.0)  # attached
            cpu0 = cpu_split(procs[0].pid)
            t0 = time.perf_counter()
            bid = provider._send_and_drain(conn, n / 50 + 120)
            seconds = time.perf_counter() - t0
            cpu = [b - a for a, b in zip(cpu0, cpu_split(procs[0].pid), strict=True)]
            row = conn.execute("SELECT count(DISTINCT claim_token) AS g FROM "
                               "broadcast_recipients WHERE broadcast_id = %s", (bid,)).fetchone()
            groups = int(row["g"]) if row else 0
        finally:
            if spy_proc is not None:
                spy_proc.send_signal(signal.SIGINT)
                spy_proc.wait(60)
            provider._stop(procs)
    user, system, kids = (x / n * 1000 for x in cpu)
    return Drained(n, seconds, user, system, kids, groups)


def main(argv: list[str] | None = None) -> None:
    """Two drains (plain, then under py-spy), the CPU per message and the profile's buckets."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipients", type=int, default=6000)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25, help="functions to list by inclusive share")
    p.add_argument("--provider", choices=("ses", "null"), default="ses",
                   help="null: the same worker with the null provider (no endpoint is called)")
    p.add_argument("--keep", type=Path, help="also copy py-spy's raw output here")
    p.add_argument("--send-email", action="store_true",
                   help="ses: one SendEmail per message (PGCAST_SES_BULK=0), not SendBulkEmail")
    args = p.parse_args(argv)
    print(f"cpus {os.cpu_count()}, load average at start "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    logs = Path(tempfile.mkdtemp(prefix="pgcast-profile-cpu-"))
    raw = logs / "pyspy.raw"
    with sesd.running(args.latency_ms / 1000) as endpoint, common.server() as srv, \
            common.database(srv, "profile_cpu") as url:
        env: dict[str, Any] = {**endpoint.env(), "PGCAST_RATE": "0"}
        if args.provider == "null":
            env["PGCAST_PROVIDER"] = "null"
        if args.send_email:
            env["PGCAST_SES_BULK"] = "0"
        plain = drain(url, env, args.recipients, logs, "plain", None, args.rate)
        calls = (endpoint.bulk_calls, endpoint.bulk_entries, len(endpoint.snapshot()))
        spied = drain(url, env, args.recipients, logs, "spied", raw, args.rate)
    print(f"in µs per delivered message: worker {plain.worker * 1000:.1f} (user "
          f"{plain.user * 1000:.1f}, system {plain.system * 1000:.1f}), its render processes "
          f"{plain.render_procs * 1000:.1f}, together "
          f"{(plain.worker + plain.render_procs) * 1000:.1f}")
    bulk_calls, bulk_entries, received = calls
    print(f"plain drain: {bulk_calls:,} SendBulkEmail calls ({bulk_entries:,} entries, "
          f"{bulk_entries / max(bulk_calls, 1):.1f} a call), "
          f"{received - bulk_entries:,} SendEmail calls")
    print(f"{args.provider} provider{' (SendEmail only)' if args.send_email else ''}: "
          f"worker CPU per delivered message, {args.latency_ms:g} ms endpoint, no limit, 1 "
          f"process: {plain.worker:.2f} ms (user {plain.user:.2f}, system {plain.system:.2f}; "
          f"{plain.n:,} in {plain.seconds:.1f}s = {plain.n / plain.seconds:,.0f}/s); its render "
          f"processes another {plain.render_procs:.2f} ms; {plain.groups:,} groups "
          f"({plain.n / max(plain.groups, 1):.0f} recipients each); under py-spy "
          f"{spied.worker:.2f} ms "
          f"({spied.n / spied.seconds:,.0f}/s)")
    stacks = read_raw(raw)
    total = sum(c for _, c in stacks) or 1
    by_bucket: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    in_call = 0
    for frames, count in stacks:
        by_bucket[bucket(frames)] += count
        for f in set(frames):
            inclusive[f] += count
        if any(call in f for f in frames for call in PROVIDER_CALL):
            in_call += count
    print(f"py-spy --gil: {total:,} samples at {args.rate}/s; inside SesProvider.send(_many) "
          f"{100 * in_call / total:.1f}%")
    print(f"samples with a thread holding the GIL: {total:,} in {spied.seconds:.1f}s; the "
          f"worker used {spied.worker * spied.n / spied.seconds / 10:.0f}% of a core meanwhile")
    print("share of GIL-holding samples (and that share of the plain drain's "
          f"{plain.user:.2f} ms user CPU per message):")
    for name, count in by_bucket.most_common():
        print(f"  {100 * count / total:5.1f}%  {plain.user * count / total:6.3f} ms  {name}")
    print(f"top {args.top} frames by inclusive share:")
    for f, count in inclusive.most_common(args.top):
        print(f"  {100 * count / total:5.1f}%  {f[:110]}")
    if args.keep:
        args.keep.write_bytes(raw.read_bytes())
    print("load average at end " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("reproduce: " + common.command("profile_cpu", "--recipients", str(args.recipients),
                                         "--latency-ms", f"{args.latency_ms:g}",
                                         "--provider", args.provider,
                                         *(["--send-email"] if args.send_email else [])))


if __name__ == "__main__":
    main()
