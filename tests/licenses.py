"""`make licenses`: refuse a copyleft licence among pgcast's runtime dependencies.

    python -m tests.licenses            # the installed closure of pgcast and pgcast[embedded]

The set checked is what a user installs with pgcast: the closure of pgcast's requirements
(and of its `embedded` extra) over the installed distributions, read with importlib.metadata,
following markers and extras; never the `dev` extra (tests, lint, benchmarks). A
distribution's licence is read from its License-Expression (SPDX), else its `License ::`
classifiers, else a short License field, else the first lines of its licence file.

Refused: strong copyleft (GPL, AGPL, SSPL, EUPL, OSL, ...), always; weak copyleft (LGPL, MPL,
EPL, ...) unless REVIEWED names the distribution with the reason it is acceptable; and a
distribution whose licence cannot be read. An expression's `OR` is a choice (one acceptable
branch is enough), `AND` needs every part.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from email.message import Message
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT_DIST = "pgcast"
RUNTIME_EXTRAS = frozenset({"", "embedded"})  # what users install; `dev` is not shipped

STRONG = ("AGPL", "GPL", "SSPL", "EUPL", "OSL", "CC-BY-SA", "RPL", "CPAL", "SLEEPYCAT")
WEAK = ("LGPL", "MPL", "EPL", "CDDL", "CPL", "MS-RL")

# weak copyleft that pgcast may use, and why: a reviewed decision per distribution
REVIEWED = {
    # LGPL-3.0-only. pgcast imports psycopg unmodified; pip installs it as its own
    # distribution, which a user may replace or rebuild (LGPL-3.0 section 4); pgcast's wheel
    # carries no part of it. It is the Postgres driver the whole engine is built on (and
    # procrastinate's).
    "psycopg": "LGPL-3.0: used unmodified as a separately installed, replaceable library",
    "psycopg-binary": "LGPL-3.0: psycopg's C speedups, installed and replaceable on its own",
    "psycopg-pool": "LGPL-3.0: psycopg's pool, installed and replaceable on its own",
    # MPL-2.0 (file-level copyleft): the CA bundle webhook deliveries verify against, used
    # unmodified; MPL asks only that changes to its own files be shared
    "certifi": "MPL-2.0: CA certificates read unmodified (webhook deliveries)",
}

_CLASSIFIER = {  # `License :: OSI Approved :: X` -> an SPDX-like name good enough to judge
    "GNU Affero General Public License": "AGPL",
    "GNU Lesser General Public License": "LGPL",
    "GNU Library or Lesser General Public License": "LGPL",
    "GNU General Public License": "GPL",
    "Mozilla Public License": "MPL",
    "Eclipse Public License": "EPL",
    "European Union Public Licence": "EUPL",
}
_TEXT = (  # the first lines of a licence file
    ("GNU AFFERO GENERAL PUBLIC LICENSE", "AGPL"),
    ("GNU LESSER GENERAL PUBLIC LICENSE", "LGPL"),
    ("GNU GENERAL PUBLIC LICENSE", "GPL"),
    ("Mozilla Public License", "MPL"),
    ("Apache License", "Apache-2.0"),
    ("Permission is hereby granted, free of charge", "MIT"),
    ("Redistribution and use in source and binary forms", "BSD"),
    ("Permission to use, copy, modify, and/or distribute", "ISC"),
    ("This is free and unencumbered software", "Unlicense"),
)


@dataclass(frozen=True)
class Verdict:
    """One distribution's licence as read, and whether pgcast may depend on it."""

    name: str
    version: str
    licence: str
    ok: bool
    why: str


def _kind(term: str) -> str:
    """'strong', 'weak' or 'permissive' for one licence name (SPDX id or free text)."""
    up = term.upper().replace(" ", "-")
    if "LESSER" in up or "LIBRARY" in up or up.startswith("LGPL"):
        return "weak"
    if any(up.startswith(s) or f"-{s}" in up or up.startswith(f"GNU-{s}") for s in STRONG) \
            or "GENERAL-PUBLIC" in up or "AFFERO" in up:
        return "strong"
    if any(up.startswith(w) for w in WEAK) or "MOZILLA" in up or "ECLIPSE" in up:
        return "weak"
    return "permissive"


def judge_expression(expr: str, name: str) -> tuple[bool, str]:
    """An SPDX expression: one acceptable OR branch is enough; AND needs every part."""
    reasons: list[str] = []
    for branch in re.split(r"\s+OR\s+", expr.replace("(", " ").replace(")", " ").strip()):
        parts = [p for p in re.split(r"\s+AND\s+|\s+WITH\s+\S+", branch) if p.strip()]
        bad = [(p.strip(), _kind(p)) for p in parts if _kind(p) != "permissive"]
        if not bad:
            return True, "permissive"
        if all(k == "weak" for _, k in bad) and canonicalize_name(name) in REVIEWED:
            return True, f"reviewed: {REVIEWED[canonicalize_name(name)]}"
        reasons.append(", ".join(f"{p} ({k} copyleft)" for p, k in bad))
    return False, "; ".join(reasons)


def licence_of(meta: Message, files: list[tuple[str, str]]) -> str | None:
    """The licence as an expression-like string, from the best field there is."""
    expr = (meta.get("License-Expression") or "").strip()
    if expr:
        return expr
    names = []
    for c in meta.get_all("Classifier") or []:
        if c.startswith("License :: ") and c.count("::") >= 2:
            label = c.split("::")[-1].strip()
            for phrase, short in _CLASSIFIER.items():
                if label.startswith(phrase):
                    label = short
                    break
            names.append(label)
    if names:
        return " OR ".join(names)  # several classifiers: the package offers each
    text = (meta.get("License") or "").strip()
    if text and len(text) <= 100 and "\n" not in text:
        return text
    for head in [text] + [body for _, body in files]:
        first = " ".join(head[:600].split())
        for phrase, short in _TEXT:
            if phrase.lower() in first.lower():
                return short
    return None


def judge(name: str, version: str, meta: Message,
          files: list[tuple[str, str]] | None = None) -> Verdict:
    """Whether pgcast may depend on this distribution."""
    found = licence_of(meta, files or [])
    if found is None:
        return Verdict(name, version, "?", False, "no licence metadata or licence file")
    ok, why = judge_expression(found, name)
    return Verdict(name, version, found, ok, why)


def _licence_files(dist: metadata.Distribution) -> list[tuple[str, str]]:
    out = []
    for f in dist.files or []:
        if re.search(r"(LICEN[CS]E|COPYING)", Path(str(f)).name, re.IGNORECASE):
            try:
                body = Path(str(f.locate())).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            out.append((str(f), body[:2000]))
    return out


def closure(root: str = ROOT_DIST,
            extras: frozenset[str] = RUNTIME_EXTRAS) -> dict[str, metadata.Distribution]:
    """The installed distributions `root` needs with these extras, by canonical name."""
    env = default_environment()
    seen: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        dist = seen.get(key) or metadata.distribution(name)  # PackageNotFoundError: broken
        seen[key] = dist
        for extra in wanted | {""}:
            if (key, extra) in done:
                continue
            done.add((key, extra))
            for line in dist.requires or []:
                req = Requirement(line)
                if req.marker and not req.marker.evaluate({**env, "extra": extra}):
                    continue
                if not req.marker and extra:
                    continue  # unconditional requirements came with extra ""
                todo.append((req.name, frozenset(req.extras)))
    return seen


def main() -> int:
    verdicts = []
    for key, dist in sorted(closure().items()):
        if key == canonicalize_name(ROOT_DIST):
            continue
        verdicts.append(judge(dist.metadata["Name"], dist.version, dist.metadata,
                              _licence_files(dist)))
    width = max(len(v.name) for v in verdicts)
    for v in verdicts:
        mark = "ok     " if v.ok else "REFUSED"
        print(f"{mark} {v.name:<{width}} {v.version:<12} {v.licence}"
              + ("" if v.why == "permissive" else f"  [{v.why}]"))
    refused = [v for v in verdicts if not v.ok]
    print(f"{len(verdicts)} runtime distributions (pgcast and pgcast[embedded]); "
          f"{len(refused)} refused")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
