"""Loads the named blocks of every sql/*.sql file once, into QUERIES."""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString

_HEADER = re.compile(r"^-- ([a-z0-9_]+) --$", re.MULTILINE)


def parse(text: str) -> dict[str, LiteralString]:
    """Split a .sql file of `-- name --` blocks into {name: statement}."""
    parts = _HEADER.split(text)
    queries: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip().splitlines()
        # the first line of a block is its one-line description
        statement = "\n".join(lines[1:] if lines and lines[0].startswith("--") else lines).strip()
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = statement
    return queries


def load() -> dict[str, LiteralString]:
    """Every block of every .sql file in this package; a name may be defined once."""
    queries: dict[str, LiteralString] = {}
    files = sorted((f for f in resources.files(__package__).iterdir() if f.name.endswith(".sql")),
                   key=lambda f: f.name)
    for f in files:
        for name, statement in parse(f.read_text()).items():
            if name in queries:
                raise ValueError(f"query {name!r} is defined twice ({f.name})")
            queries[name] = statement
    return queries


QUERIES = load()
