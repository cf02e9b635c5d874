"""Loads the named blocks of queries.sql once, into QUERIES."""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString, cast

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
        queries[name] = cast(LiteralString, statement)
    return queries


QUERIES = parse(resources.files(__package__).joinpath("queries.sql").read_text())
