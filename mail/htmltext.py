"""HTML as readable plain text, with the standard library's html.parser (no dependency).

What a plain-text part needs: the words, in order, with paragraphs, line breaks, headings
(`# Title`), lists (`* item`, `1. item`), quotes (`> `), table rows (cells joined by ` | `)
and links (`[text](url)`, or the address alone when it is the text). Scripts, styles, the
head and comments are dropped; so are images and every attribute but a link's `href` (the
caller relies on that: a template tag anywhere else does not come through). Inline emphasis
is not marked. Linear in the input: one pass of the parser, no backtracking.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCKS = {"address", "article", "aside", "blockquote", "center", "dd", "details", "dialog",
           "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header",
           "hr", "li", "main", "nav", "p", "pre", "section", "summary", "table", "tbody",
           "tfoot", "thead", "tr"}
_PARAGRAPHS = {"p", "blockquote", "pre", "table", "dl", "figure", "hr"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_SKIP = {"script", "style", "head", "title", "template", "noscript", "svg", "math"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}
MAX_DEPTH = 8  # nested lists and quotes indent at most this deep: the output stays linear
_SPACE = re.compile(r"[ \t\n\r\f\v]+")


class _Converter(HTMLParser):
    """Collects lines; `pending` says how many line ends come before the next word."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []  # finished lines
        self.cur: str | None = None  # the open line, its prefix included
        self.fresh = False  # the open line holds only its prefix
        self.pending = 0  # 0: same line, 1: a new line, 2: a blank line first
        self.skip = 0  # depth inside script, style, head, ...
        self.pre = 0
        self.quote = 0
        self.last_quote = 0  # the quote depth of the last finished line
        self.lists: list[list[int]] = []  # per open list: [ordered, next number]
        self.bullet = ""  # a list item's marker, written when its line opens
        self.links: list[tuple[str | None, int, int]] = []  # (href, lines then, column then)
        self.cells = 0  # cells written in the current table row

    # -- writing -----------------------------------------------------------------------

    def _end_line(self) -> None:
        if self.cur is not None:
            self.out.append(self.cur.rstrip())
            self.last_quote = self.quote
            self.cur = None

    def _settle(self) -> None:
        if not self.pending:
            return
        self._end_line()
        if self.out:  # a blank line between a quote and what is around it is outside it
            blank = ("> " * min(self.quote, self.last_quote, MAX_DEPTH)).rstrip()
            self.out.extend([blank] * (self.pending - 1))
        self.pending = 0

    def _open(self) -> None:
        self._settle()
        if self.cur is None:
            indent = "  " * min(len(self.lists) - 1, MAX_DEPTH) if self.lists else ""
            self.cur = "> " * min(self.quote, MAX_DEPTH) + indent + self.bullet
            self.bullet = ""
            self.fresh = True

    def _write(self, text: str) -> None:
        self._open()
        assert self.cur is not None
        self.cur += text
        self.fresh = self.fresh and not text

    def _break(self, n: int) -> None:
        self.pending = max(self.pending, n)

    # -- the parser's callbacks --------------------------------------------------------

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.pre:
            for i, part in enumerate(data.split("\n")):
                if i:
                    self._end_line()
                    self._open()
                self._write(part)
            return
        data = _SPACE.sub(" ", data)
        if self.cur is None or self.pending or self.fresh or self.cur.endswith(" "):
            data = data.lstrip()
        if data:
            self._write(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
            return
        if self.skip:
            return
        if tag in ("ul", "ol"):
            self._break(1 if self.lists else 2)
            start = dict(attrs).get("start") or "1"
            self.lists.append([tag == "ol", int(start) if start.isdigit() else 1])
        elif tag in _PARAGRAPHS or tag in _HEADINGS:
            self._break(2)
        elif tag in _BLOCKS:
            self._break(1)
        if tag == "br":
            self._line_break()
        elif tag == "hr":
            self._write("---")
            self._break(2)
        elif tag in _HEADINGS:
            self._write("#" * _HEADINGS[tag] + " ")
        elif tag == "li":
            if self.lists and self.lists[-1][0]:
                self.bullet = f"{self.lists[-1][1]}. "
                self.lists[-1][1] += 1
            else:
                self.bullet = "* "
        elif tag == "blockquote":
            self._end_line()
            self.quote += 1
        elif tag == "pre":
            self.pre += 1
        elif tag == "tr":
            self.cells = 0
        elif tag in ("td", "th"):
            if self.cells:
                self._write(" | ")
            self.cells += 1
        elif tag == "a":
            self._open()
            assert self.cur is not None
            self.links.append((dict(attrs).get("href"), len(self.out), len(self.cur)))

    def _line_break(self) -> None:
        if self.pending:
            return  # a block boundary already ends the line
        if self.cur is not None:
            self._end_line()
        elif self.out:
            self.out.append(("> " * min(self.quote, MAX_DEPTH)).rstrip())

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(self.skip - 1, 0)
            return
        if self.skip:
            return
        if tag == "a" and self.links:
            self._close_link(*self.links.pop())
        elif tag in ("ul", "ol") and self.lists:
            self.lists.pop()
            self._break(1 if self.lists else 2)
            return
        elif tag == "blockquote" and self.quote:
            self._end_line()
            self.quote -= 1
        elif tag == "pre" and self.pre:
            self.pre -= 1
        if tag in _PARAGRAPHS or tag in _HEADINGS:
            self._break(2)
        elif tag in _BLOCKS:
            self._break(1)

    def _close_link(self, href: str | None, lines: int, column: int) -> None:
        href = (href or "").strip()
        if not href or href.startswith("#"):
            return  # no address worth reading: the text alone
        if len(self.out) != lines or self.cur is None:
            self._write(f" ({href})")  # the text spans lines: the address after it
            return
        head, text = self.cur[:column], self.cur[column:].strip()
        if not text:
            self.cur = head + href
        elif text == href or f"mailto:{text}" == href:
            self.cur = head + text
        else:
            self.cur = f"{head}[{text}]({href})"
        self.fresh = False

    def close(self) -> None:
        super().close()
        self._end_line()


def convert(html: str) -> str:
    """Rendered HTML as plain text, ending with one newline (empty text: just the newline)."""
    parser = _Converter()
    parser.feed(html)
    parser.close()
    lines = parser.out
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"
