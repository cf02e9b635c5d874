"""The plain-text alternative of an HTML-only broadcast, made with mail.htmltext.

Converted once per broadcast where the template allows it: each Jinja tag of the HTML
template is set aside as a placeholder, the HTML is converted, and the tags are put back,
which gives a text template rendered per recipient like any other. When a placeholder does
not come through exactly once and in order (a tag inside an attribute the conversion
drops), the rendered HTML is converted per recipient instead.
"""

from __future__ import annotations

import re

from pgcast.mail import htmltext

_CLOSERS = {"{{": "}}", "{%": "%}", "{#": "#}"}
_PLACEHOLDER = "PGCASTJINJA{:06d}X"


def convert(html: str) -> str:
    """Rendered HTML as plain text (links kept as `[text](url)`, no re-wrapping)."""
    return htmltext.convert(html)


def _park(source: str, tags: list[str]) -> str:
    """Each Jinja tag of `source` set aside (into `tags`) as a placeholder.

    A linear scan with str.find: the regex it replaces (`\\{#.*?#\\}` with DOTALL) scanned to the
    end again for every opener without a closer, quadratic in a source of many `{#`. An
    opener without a closer is left as it is (the caller then gives up on the template).
    """
    out: list[str] = []
    at = 0
    unclosed: set[str] = set()  # openers with no closer after some point: none further on
    start = source.find("{")
    while start != -1:
        opener = source[start:start + 2]
        if opener in _CLOSERS and opener not in unclosed:
            end = source.find(_CLOSERS[opener], start + 2)
            if end != -1:
                out.append(source[at:start])
                tags.append(source[start:end + 2])
                out.append(_PLACEHOLDER.format(len(tags) - 1))
                at = end + 2
                start = source.find("{", at)
                continue
            unclosed.add(opener)
        start = source.find("{", start + 1)
    out.append(source[at:])
    return "".join(out)


def template(html_source: str) -> str | None:
    """A text template made from an HTML template once, or None when that cannot be done."""
    tags: list[str] = []
    parked = _park(html_source, tags)
    if any(opener in parked for opener in ("{{", "{%", "{#")):
        return None  # a tag we could not set aside whole
    text = convert(parked)
    found = re.findall(r"PGCASTJINJA(\d{6})X", text)
    if [int(i) for i in found] != list(range(len(tags))):
        return None
    # the converter's own output must not become Jinja syntax when read as a template
    pieces = re.split(r"PGCASTJINJA\d{6}X", text)
    if any("{" in piece or "}" in piece for piece in pieces):
        pieces = ["{% raw %}" + p + "{% endraw %}" if ("{" in p or "}" in p) else p
                  for p in pieces]
    out = pieces[0]
    for i, piece in enumerate(pieces[1:]):
        out += tags[i] + piece
    return out
