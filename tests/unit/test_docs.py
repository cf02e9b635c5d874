"""The documents point at files the repository has; packaging metadata is current (PEP 639)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve_and_nothing_cites_a_missing_design_file() -> None:
    for doc in DOCS:
        text = doc.read_text()
        assert "DESIGN.md" not in text, doc.name
        # a link shown as an example in a code span (`[text](url)`) is not a link
        for target in LINK.findall(re.sub(r"`[^`]*`", "", text)):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), (doc.name, target)


def test_the_design_document_is_linked_from_the_readme() -> None:
    assert "(docs/design.md)" in (ROOT / "README.md").read_text()
    text = (ROOT / "docs" / "design.md").read_text()
    for section in ("## State machines", "## Invariants", "## Lock order and durability"):
        assert section in text


def test_the_license_is_an_spdx_expression() -> None:
    # a TOML table here makes setuptools >= 77 warn at every install (PEP 639)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
