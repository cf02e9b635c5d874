"""api.http.loads decodes in steps exactly what json.loads decodes, and refuses the same."""

from __future__ import annotations

import json

import pytest

from pgcast.api import http

GOOD = [b'{}', b' { } ', b'[]', b'"x"', b'3', b'null', b'{"a": []}', b'{"a":[ ]}',
        b'{"contacts": [{"email": "a@b.c", "tags": ["x", "y"]}, {"email": "d"}], "n": 1}',
        b'{"a": 1, "a": [2, [3, {"b": [4]}]]}', b'\xef\xbb\xbf{"bom": [1]}',
        '{"z": ["Zo\u00eb", "\\ud800"]}'.encode(), '{"x": [1]}'.encode("utf-16"),
        b'\n\t{\r\n "k" :\n[ 1 ,2\n,\t3 ] , "m" : {"n": [] } }\n']
BAD = [b'', b'{', b'{"a": [1, 2}', b'{"a": [1,]}', b'{"a" 1}', b'{a: 1}', b'{"a": 1,}',
       b'{"a": [1]} x', b'[1] [2]', b'{"a": NaN}', b'{"a": [Infinity]}', b'{"a": [1 2]}',
       b'{"a": [', b'{"a": [1],', b'\xff{}', b'{"a": [-]}', b'{,}', b'{"a": 1 "b": 2}']


@pytest.mark.parametrize("raw", GOOD)
def test_the_same_values_as_json_loads(raw: bytes) -> None:
    assert http.loads(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", BAD)
def test_the_same_refusals(raw: bytes) -> None:
    with pytest.raises(ValueError):
        http.loads(raw)
    with pytest.raises(ValueError):
        json.loads(raw, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
