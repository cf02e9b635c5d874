"""The systemd units in deploy/ run commands pgcast has, with settings from one file."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from pgcast.bin import cli

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERVICES = sorted(DEPLOY.glob("*.service"))


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path)
    return parser


@pytest.mark.parametrize("path", SERVICES, ids=[p.name for p in SERVICES])
def test_each_service_runs_a_pgcast_command_the_parser_accepts(path: Path) -> None:
    service = unit(path)["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/pgcast/.venv/bin/pgcast"
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command in ("worker", "api")
    assert service["EnvironmentFile"] == "/etc/pgcast/pgcast.env"
    assert service["User"] == "pgcast"


def test_the_timer_starts_the_one_pass_worker_and_the_examples_are_documented() -> None:
    timer = DEPLOY / "pgcast-worker-once.timer"
    assert unit(timer)["Timer"]["OnCalendar"]
    once = unit(DEPLOY / "pgcast-worker-once.service")["Service"]
    assert "--once" in shlex.split(once["ExecStart"]) and once["Type"] == "oneshot"
    readme = (DEPLOY.parent / "README.md").read_text()
    for path in [*SERVICES, timer, DEPLOY / "pgcast.env.example"]:
        assert f"deploy/{path.name}" in readme, path.name


def test_the_environment_example_names_only_documented_variables() -> None:
    readme = (DEPLOY.parent / "README.md").read_text()
    for line in (DEPLOY / "pgcast.env.example").read_text().splitlines():
        line = line.lstrip("# ")
        if "=" in line and line.split("=")[0].isupper():
            assert f"`{line.split('=')[0]}" in readme, line
