"""mail.htmltext: the plain-text part keeps headings, lists, links, quotes and tables."""

from __future__ import annotations

import pytest

from pgcast.mail import htmltext


def test_headings_paragraphs_links_and_emphasis() -> None:
    got = htmltext.convert('<h1>News</h1><h2>This week</h2><p>Hello <b>Ann</b>, '
                           'read <a href="https://e.com/a">the post</a>.</p>'
                           '<p><a href="https://e.com/u">https://e.com/u</a> '
                           '<a href="mailto:help@e.com">help@e.com</a> '
                           '<a href="#top">top</a> <a href="https://e.com/i"><img src="i.png"></a>'
                           '</p>')
    assert got == ("# News\n\n## This week\n\nHello Ann, read [the post](https://e.com/a).\n\n"
                   "https://e.com/u help@e.com top https://e.com/i\n")


def test_lists_nest_and_ordered_lists_count_from_start() -> None:
    got = htmltext.convert('<p>Agenda:</p><ul><li>one</li><li>two</li></ul>'
                           '<ol start="3"><li>a</li><li>b<ul><li>inner</li></ul></li></ol>'
                           '<p>after</p>')
    assert got == "Agenda:\n\n* one\n* two\n\n3. a\n4. b\n  * inner\n\nafter\n"


def test_breaks_quotes_tables_rules_and_pre() -> None:
    got = htmltext.convert('a<br>b<br><br>c<blockquote><p>q1</p><p>q2</p></blockquote>'
                           '<table><tr><th>k</th><th>v</th></tr><tr><td>1</td><td>2</td></tr>'
                           '</table><hr><pre>  x\n    y</pre><p>1 &amp; 2 &lt;3&gt;</p>')
    assert got == ("a\nb\n\nc\n\n> q1\n>\n> q2\n\nk | v\n1 | 2\n\n---\n\n  x\n    y\n\n"
                   "1 & 2 <3>\n")


def test_head_scripts_styles_comments_and_attributes_are_dropped() -> None:
    got = htmltext.convert('<html><head><title>T</title><style>p {color: red}</style></head>'
                           '<body><!-- hidden --><script>alert(1)</script>'
                           '<div title="no">A</div><div>  B   C </div><img alt="no"></body></html>')
    assert got == "A\nB C\n"
    assert htmltext.convert("") == "\n"


@pytest.mark.timeout(60, method="thread")
def test_conversion_is_one_pass_over_a_hostile_document() -> None:
    # tenants' HTML: 40,000 unclosed nested lists and quotes, a link in each (about 2 MB),
    # take a second or two in one pass; anything quadratic in them would take hours, and an
    # indent per level would make the text itself quadratic (1.6e9 characters)
    n = 40_000
    html = "<ul><li><blockquote><a href='https://e.com/x'>x</a>" * n
    got = htmltext.convert(html)
    assert got.count("[x](https://e.com/x)") == n
    assert len(got) < 100 * n  # indents stop at MAX_DEPTH levels: about 71 characters each
