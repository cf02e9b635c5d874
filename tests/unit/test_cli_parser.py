"""The CLI's parser and the README agree; every argument explains itself; the watch bar."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgcast.bin import cli, progressbar

README = Path(__file__).resolve().parents[2] / "README.md"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def parsers(p: argparse.ArgumentParser, path: str = "pgcast"
            ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the command tree, with its command path."""
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


def arguments() -> Iterator[tuple[str, argparse.Action]]:
    for path, p in parsers(cli.build_parser()):
        for action in p._actions:
            if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                yield path, action


def test_every_argument_and_flag_has_a_help_line() -> None:
    missing = [(path, a.dest) for path, a in arguments() if not (a.help or "").strip()]
    assert missing == []


def readme_flags(text: str) -> set[str]:
    """Flags the README gives pgcast: in code spans that start with `pgcast` or a flag, and
    in lines of code blocks that start with `pgcast` (not other programs' flags)."""
    spans: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            if line.strip().startswith(("pgcast ", "ExecStart=", "sudo -u pgcast")):
                spans.append(line.strip())
            continue
        spans += re.findall(r"`([^`]+)`", line)
    found: set[str] = set()
    for span in spans:
        first = span.split()[0] if span.split() else ""
        # `pgcast ...`, `bin/pgcast ...`, `ExecStart=/path/bin/pgcast ...`, or a flag alone
        if first.endswith("pgcast") or first.startswith("--"):
            found |= set(FLAG.findall(span))
    return found


def test_every_flag_in_help_is_in_the_readme_and_the_other_way_round() -> None:
    # whatever commands the parser has (more arrive with every branch), both ways
    in_help = {opt for _, p in parsers(cli.build_parser()) for a in p._actions
               for opt in a.option_strings if opt.startswith("--")}
    in_readme = readme_flags(README.read_text())
    assert in_help - in_readme == set(), "flags missing from README.md"
    assert in_readme - in_help == set(), "README.md names flags pgcast does not have"


def test_the_watch_bar_shows_no_eta_while_paused() -> None:
    p = {"status": "paused", "total": 100, "pending": 60, "sent": 40, "skipped": 0,
         "failed": 0}
    assert "ETA -" in progressbar.line(p, rate=25.0)
    assert "ETA 2s" in progressbar.line({**p, "status": "sending"}, rate=25.0)


def row(status: str, total: int = 0, pending: int = 0, **counts: Any) -> dict[str, Any]:
    """A progress row as the API's progress shape has it."""
    return {"status": status, "total": total, "pending": pending, "sent": 0, "skipped": 0,
            "failed": 0, "cancelled": 0, "scheduled_at": "2099-01-01T09:00:00+00:00",
            **counts}


def test_watching_a_draft_returns_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    reads = iter([row("draft")])
    assert progressbar.watch(lambda: next(reads), every=0, scheduled_every=0)["status"] == "draft"
    assert "nothing to watch" in capsys.readouterr().err


def test_watching_a_scheduled_broadcast_waits_for_it_without_a_bar(
        capsys: pytest.CaptureFixture[str]) -> None:
    reads = iter([row("scheduled"), row("scheduled"), row("sending", 10, 10),
                  row("sent", 10, 0, sent=10)])
    final = progressbar.watch(lambda: next(reads), every=0, scheduled_every=0)
    assert final["status"] == "sent"
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "scheduled for 2099-01-01T09:00:00+00:00: waiting for it to start"
    assert "0/0" not in "\n".join(out) and out[-1].startswith("[" + "#" * 30 + "] 10/10 sent")


def test_a_cancelled_broadcast_does_not_draw_a_full_bar() -> None:
    p = row("cancelled", 100, 0, sent=20, cancelled=80)
    assert progressbar.line(p, 0.0).startswith("[" + "#" * 6 + "-" * 24 + "] 20/100 sent")
