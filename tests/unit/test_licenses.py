"""tests/licenses.py (`make licenses`): which runtime licences CI refuses, on made-up metadata."""

from __future__ import annotations

from email.message import Message

from tests import licenses

APACHE = "                                 Apache License\n   Version 2.0, January 2004\n"


def meta(expression: str = "", licence: str = "", *classifiers: str) -> Message:
    m = Message()
    if expression:
        m["License-Expression"] = expression
    if licence:
        m["License"] = licence
    for c in classifiers:
        m["Classifier"] = c
    return m


def test_copyleft_is_refused_whichever_field_says_it() -> None:
    # html2text 2024.2.26, which pgcast depended on, as its metadata reads
    html2text = meta("", "GNU GPL 3",
                     "License :: OSI Approved :: GNU General Public License v3 (GPLv3)")
    assert not licenses.judge("html2text", "2024.2.26", html2text, []).ok
    assert not licenses.judge("x", "1", meta("AGPL-3.0-or-later"), []).ok
    assert not licenses.judge("x", "1", meta("MIT AND GPL-2.0-only"), []).ok
    assert not licenses.judge("x", "1", meta("", "GPLv3"), []).ok
    gpl_file = [("COPYING", "  GNU GENERAL PUBLIC LICENSE\n  Version 3, 29 June 2007")]
    assert not licenses.judge("x", "1", meta(), gpl_file).ok


def test_weak_copyleft_only_where_reviewed_and_a_choice_is_enough() -> None:
    assert not licenses.judge("somelib", "1", meta("LGPL-3.0-only"), []).ok
    assert not licenses.judge("somelib", "1", meta("MPL-2.0"), []).ok
    assert licenses.judge("psycopg", "3.2", meta("LGPL-3.0-only"), []).ok
    assert licenses.judge("psycopg", "3.2", meta("GPL-3.0-only"), []).ok is False
    assert licenses.judge("x", "1", meta("MIT OR GPL-3.0-or-later"), []).ok
    assert licenses.judge("x", "1", meta("(Apache-2.0 OR BSD-3-Clause) AND MIT"), []).ok


def test_permissive_from_each_field_and_unknown_is_refused() -> None:
    assert licenses.judge("x", "1", meta("", "", "License :: OSI Approved :: MIT License")).ok
    assert licenses.judge("x", "1", meta("", "BSD-3-Clause"), []).ok
    got = licenses.judge("pgserver", "0.1.4", meta(), [("LICENSE", APACHE)])
    assert got.ok and got.licence == "Apache-2.0"
    unknown = licenses.judge("x", "1", meta(), [])
    assert not unknown.ok and "no licence" in unknown.why


def test_the_runtime_closure_leaves_out_the_dev_extra() -> None:
    names = set(licenses.closure())
    assert {"pgcast", "psycopg", "starlette", "jinja2", "pgserver"} <= names
    assert not names & {"pytest", "mypy", "moto", "playwright", "html2text", "build"}
