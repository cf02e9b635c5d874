"""The plain-text alternative of an HTML-only broadcast, made with html2text.

Converted once per broadcast where the template allows it: each Jinja tag of the HTML
template is set aside as a placeholder, the HTML is converted, and the tags are put back,
which gives a text template rendered per recipient like any other. When a placeholder does
not come through exactly once and in order (a tag inside an attribute html2text drops), the
rendered HTML is converted per recipient instead.
"""

from __future__ import annotations

import re

import html2text

_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)
_PLACEHOLDER = "PGCASTJINJA{:06d}X"


def convert(html: str) -> str:
    """Rendered HTML as plain text (links kept as `[text](url)`, no re-wrapping)."""
    maker = html2text.HTML2Text()
    maker.body_width = 0  # no re-wrapping: a long URL stays on one line
    maker.ignore_images = True
    maker.unicode_snob = True
    return str(maker.handle(html)).strip() + "\n"


def template(html_source: str) -> str | None:
    """A text template made from an HTML template once, or None when that cannot be done."""
    tags: list[str] = []

    def park(match: re.Match[str]) -> str:
        tags.append(match.group(0))
        return _PLACEHOLDER.format(len(tags) - 1)

    parked = _TAG.sub(park, html_source)
    if any(opener in parked for opener in ("{{", "{%", "{#")):
        return None  # a tag we could not set aside whole
    text = convert(parked)
    found = re.findall(r"PGCASTJINJA(\d{6})X", text)
    if [int(i) for i in found] != list(range(len(tags))):
        return None
    # html2text's own output must not become Jinja syntax when read as a template
    pieces = re.split(r"PGCASTJINJA\d{6}X", text)
    if any("{" in piece or "}" in piece for piece in pieces):
        pieces = ["{% raw %}" + p + "{% endraw %}" if ("{" in p or "}" in p) else p
                  for p in pieces]
    out = pieces[0]
    for i, piece in enumerate(pieces[1:]):
        out += tags[i] + piece
    return out
