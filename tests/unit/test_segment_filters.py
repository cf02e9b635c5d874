"""The edge checks of sql.segments that run before a filter reaches the compiler (no database)."""

from __future__ import annotations

from typing import Any

import pytest

from pgcast.sql import errors, segments


def test_a_filter_is_a_small_shallow_json_object() -> None:
    assert segments.bounded({"tag": "a"}) == '{"tag":"a"}'
    for bad, message in (([{"tag": "a"}], "$: a filter must be a JSON object"),
                         ("tag", "$: a filter must be a JSON object"),
                         ({"tag": "x" * 20000}, "$: too large"),
                         ({"tag": "a\x00b"}, "$: a text holds NUL"),
                         ({"tag": "\ud800"}, "$: a text holds NUL or a lone surrogate"),
                         ({"a\x00": 1}, "$: a text holds NUL")):
        with pytest.raises(errors.InvalidInput, match=f"^{message.replace('$', '[$]')}"):
            segments.bounded(bad)
    deep: Any = {"tag": "a"}
    for _ in range(100_000):  # far deeper than Python's recursion limit: checked iteratively
        deep = {"not": deep}
    with pytest.raises(errors.InvalidInput, match=r"^\$: too deep"):
        segments.bounded(deep)


def test_names_and_the_one_audience() -> None:
    assert segments.check_name("paying-beta.v2_1") == "paying-beta.v2_1"
    for bad in ("", "-x", "a b", "x" * 65, "a/b", None, 5):
        with pytest.raises(errors.InvalidInput, match="not a segment name"):
            segments.check_name(bad)
    assert segments.audience(segment="vip") == {"segment": "vip"}
    assert segments.audience(filter_value={"tag": "t"}) == {"tag": "t"}
    assert segments.audience(tag="t") is None  # a tag stays in segment_tag
    with pytest.raises(errors.InvalidInput, match="not segment and filter"):
        segments.audience(segment="vip", filter_value={"tag": "t"})


def test_parse_reads_json_text() -> None:
    assert segments.parse('{"tag": "a"}') == {"tag": "a"}
    with pytest.raises(errors.InvalidInput, match="filter is not JSON"):
        segments.parse("{tag: a}")
    with pytest.raises(errors.InvalidInput, match="filter is not JSON"):
        segments.parse("[" * 60_000)  # under the size guard, over the recursion limit
