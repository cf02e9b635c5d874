"""Forward-only numbered migrations (NNNN_name.sql) and the declared current schema."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration, in version order."""
    found = []
    for entry in resources.files(__name__).iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    return found


def current() -> str:
    """The declared current schema (what all migrations add up to)."""
    return resources.files(__name__).joinpath("current.sql").read_text()
