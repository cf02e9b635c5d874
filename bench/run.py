"""The whole suite in one run on one server, then bench/RESULTS.md rewritten with the figures."""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
from pathlib import Path
from typing import Any

from bench import common, drain, floor, peer, progress, snapshot

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

SCALES: dict[str, dict[str, int]] = {
    "full": {"floor": 1_000_000, "peer": 20_000, "big": 1_000_000, "issue2": 200_000,
             "small": 100_000, "snapshot_repeats": 5, "progress_samples": 5_000, "earlier": 500},
    "small": {"floor": 100_000, "peer": 3_000, "big": 100_000, "issue2": 50_000,
              "small": 20_000, "snapshot_repeats": 1, "progress_samples": 1_000, "earlier": 50},
}

TEMPLATE = f"""# Benchmark results

{BEGIN}
{END}

## Other benchmarks

Figures of other benchmarks (api, ratelimit, cancel latency) are recorded here by their own
commands; `make bench` keeps this section as it is.
"""


def ratio(key: str, label: str, num: float, den: float, aim: str, ok: bool,
          cmd: str, note: str) -> common.Figure:
    """A ratio of two figures measured in this run."""
    return common.Figure(key, label, num / den, "×", aim=aim, passed=ok, command=cmd, note=note)


def suite(srv: str, s: dict[str, int], scale: str, log: Any) -> list[common.Figure]:
    """Every benchmark, one after the other, each on its own database of this one server."""
    figs: list[common.Figure] = []
    suffix = [] if scale == "full" else ["--scale", scale]
    run_cmd = common.command("run", *suffix)

    def step(name: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", file=log, flush=True)

    step(f"floor: {s['floor']:,} rows")
    with common.database(srv, "floor") as url:
        fl = floor.run(url, s["floor"])
    figs += fl

    step(f"peer: {s['peer']:,} procrastinate jobs")
    with common.database(srv, "peer") as url:
        pe = peer.run(url, s["peer"])
    figs += pe

    step(f"drain: {s['issue2']:,} recipients (issue 2)")
    with common.database(srv, "issue2") as url:
        cmd = common.command("drain", "--recipients", str(s["issue2"]))
        r2 = drain.run_series(url, s["issue2"])
    f2 = drain.figures(r2, cmd, key="drain_issue2")[0]
    f2.aim, f2.passed = ">= 10,000/s (issue 2)", f2.value >= 10_000
    figs.append(f2)

    step(f"drain: {s['issue2']:,} recipients after {s['earlier']:,} earlier broadcasts")
    with common.database(srv, "earlier") as url:
        cmd = common.command("drain", "--recipients", str(s["issue2"]),
                             "--earlier", str(s["earlier"]))
        old = drain.run_series(url, s["issue2"], earlier=s["earlier"])
    fo = drain.figures(old, cmd, key="drain_earlier")[0]
    fo.label = (f"pgcast drain, {s['issue2']:,} recipients, with {s['earlier']:,} earlier "
                "broadcasts' partitions attached")
    figs.append(fo)
    figs.append(ratio("drain_earlier_vs_fresh", f"drain with {s['earlier']:,} earlier "
                      "broadcasts / on a fresh database", fo.value, f2.value,
                      ">= 0.9× (no slower as broadcasts accumulate)",
                      fo.value >= 0.9 * f2.value, run_cmd,
                      f"{fo.value:,.0f} vs {f2.value:,.0f} recipients/s"))

    step(f"drain: {s['small']:,} recipients (RSS)")
    with common.database(srv, "rss") as url:
        cmd = common.command("drain", "--recipients", str(s["small"]))
        small = drain.run_series(url, s["small"])
    rss_small = drain.figures(small, cmd, key="drain_small")[1]

    step(f"drain: 3 × {s['big']:,} recipients, then progress reads")
    with common.database(srv, "big") as url:
        cmd = common.command("drain", "--recipients", str(s["big"]), "--broadcasts", "3")
        big = drain.run_series(url, s["big"], 3)
        with common.connect(url) as conn:
            row = conn.execute("SELECT id FROM broadcasts WHERE status = 'sent' "
                               "ORDER BY started_at LIMIT 1").fetchone()
        assert row is not None
        step("progress reads")
        prog = progress.run(url, row["id"], s["big"], s["progress_samples"])
    # on a database of its own, as its command runs it: not next to three drained partitions
    # that autovacuum is still cleaning (what that costs lands unevenly on the two sides)
    step("snapshots")
    with common.database(srv, "snapshot") as url:
        snap = snapshot.run(url, s["big"], s["snapshot_repeats"])
    bf = drain.figures(big, cmd, key="drain_big")
    first, rss_big = bf[0], bf[1]
    figs.append(first)
    figs.append(ratio("drain_vs_floor", "pgcast drain / floor", first.value, fl[0].value,
                      ">= 0.5×", first.value >= 0.5 * fl[0].value, run_cmd,
                      f"{first.value:,.0f} vs {fl[0].value:,.0f} rows/s, same server, same run"))
    figs.append(ratio("drain_vs_peer", "pgcast drain / procrastinate peer", first.value,
                      pe[0].value, ">= 50×", first.value >= 50 * pe[0].value, run_cmd,
                      f"{first.value:,.0f} recipients/s vs {pe[0].value:,.0f} jobs/s"))
    figs += bf[2:]
    third = big[-1].rate / big[0].rate
    figs.append(ratio("drain_third_vs_first", "3rd consecutive broadcast / 1st", big[-1].rate,
                      big[0].rate, ">= 0.9× (within 10%)", third >= 0.9, cmd,
                      " → ".join(f"{r.rate:,.0f}/s" for r in big)))
    figs += snap
    figs += prog
    figs.append(rss_small)
    figs.append(rss_big)
    flat = max(big[0].peak_rss) / max(small[0].peak_rss)
    figs.append(ratio("rss_flat", f"peak RSS at {s['big']:,} / at {s['small']:,}",
                      max(big[0].peak_rss), max(small[0].peak_rss), "<= 1.1× (flat)",
                      flat <= 1.1, run_cmd,
                      f"{rss_big.value:.0f} MB vs {rss_small.value:.0f} MB"))
    return figs


def table(figs: list[common.Figure], info: dict[str, Any], scale: str, seconds: float) -> str:
    """The generated part of RESULTS.md."""
    settings = ", ".join(f"{k}={v}" for k, v in sorted(info["postgres_settings"].items()))
    lines = [
        f"Run {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} by "
        f"`{common.command('run', *([] if scale == 'full' else ['--scale', scale]))}` "
        f"(scale **{scale}**, {seconds / 60:.0f} min).",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), {info['memory_gb']} GB memory, "
        f"load average at start {', '.join(map(str, info['load_at_start']))} "
        f"(shared with other engineers' test runs). Postgres {info['postgres']} "
        f"({'embedded pgserver' if info['embedded'] else 'DATABASE_URL'}; {settings}), "
        f"Python {info['python']}.",
        "",
        "| figure | value | aim | result | command |",
        "|---|---:|---|---|---|",
    ]
    for f in figs:
        verdict = {True: "pass", False: "**miss**", None: "—"}[f.passed]
        label = f.label + (f"<br><sub>{f.note}</sub>" if f.note else "")
        lines.append(f"| {label} | {common.fmt(f.value)} {f.unit} | {f.aim or '—'} | "
                     f"{verdict} | `{f.command}` |")
    return "\n".join(lines)


def write(path: Path, generated: str) -> None:
    """Replace the generated block of `path`, keeping everything else (other engineers' text)."""
    text = path.read_text() if path.exists() else TEMPLATE
    if BEGIN not in text or END not in text:
        text = TEMPLATE + "\n" + text
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    if not re.search(r"^## Other benchmarks", text, re.MULTILINE):
        tail += TEMPLATE.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{generated}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    """Run the suite; rewrite bench/RESULTS.md (full scale) or print the table (small)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--out", type=Path, help="the results file to rewrite (default: "
                   "bench/RESULTS.md at full scale, none at small scale)")
    args = p.parse_args(argv)
    out = args.out or (RESULTS if args.scale == "full" else None)
    t0 = time.perf_counter()
    with common.server() as srv:
        info = common.machine(srv)
        figs = suite(srv, SCALES[args.scale], args.scale, sys.stderr)
    generated = table(figs, info, args.scale, time.perf_counter() - t0)
    for f in figs:
        print(f.line())
    if out is not None:
        write(out, generated)
        print(f"wrote {out}")
    else:
        print(generated)


if __name__ == "__main__":
    main()
