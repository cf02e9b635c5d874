"""Issue 23 items 1 and 3: a render runs under a budget enforced while it runs (mail.sandbox)."""

from __future__ import annotations

import time
import tracemalloc
import uuid

import pytest

from pgcast.mail import errors, message, template

# the three templates, accepted by POST /broadcasts on 5e12a0e
MACRO = ("{% macro f(n) %}{% for i in range(1000) %}{% if n %}{{ f(n-1) }}{% endif %}"
         "{% endfor %}{% endmacro %}{{ f(3) }}")
SQUARES = ("{% set ns = namespace(n=9**64) %}{% for i in range(40) %}"
           "{% set ns.n = ns.n * ns.n %}{% endfor %}")
DOUBLING = ("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(24) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}")
BOMBS = {
    "macro": MACRO, "squares": SQUARES, "doubling": DOUBLING,
    "recursive_for": "{% for x in [1, 2] recursive %}{{ loop([1, 2, 3]) }}{% endfor %}",
    "loop_filter": "{% set s = 'x' * 1000000 %}{% for i in range(1000) %}"
                   "{% for c in s if c == 'y' %}{% endfor %}{% endfor %}",
    "plus_doubling": ("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(24) %}"
                      "{% set ns.s = ns.s + ns.s %}{% endfor %}"),
    "list_doubling": ("{% set ns = namespace(l=[1]) %}{% for i in range(40) %}"
                      "{% set ns.l = ns.l + ns.l %}{% endfor %}"),
    "power_tower": "{{ (9 ** 64) ** 64 }}",
    "call_block": ("{% macro m() %}{{ caller() }}{{ caller() }}{% endmacro %}"
                   "{% macro g(n) %}{% if n %}{% call m() %}{{ g(n - 1) }}{% endcall %}"
                   "{% endif %}{% endmacro %}{{ g(40) }}"),
}
# each allocated hundreds of MB before the 1 MiB output check on 5e12a0e
ALLOCATORS = {
    "format": "{{ '{0:>400000000}'.format(1) }}",
    "format_map": "{{ '{a:>400000000}'.format_map({'a': 1}) }}",
    "markup_format": "{{ ('{0:>400000000}' | safe).format(1) }}",
    "lipsum": "{{ lipsum(100000) }}",
    "replace": "{{ ('x' * 1000000) | replace('x', 'xxxxxxxxxxxxxxxxxxxxxxxxxxx') }}",
    "replace_empty": "{{ ('x' * 1000000) | replace('', 'yyyyyyyyy') }}",
    "join_separator": "{{ range(1000) | join('x' * 1000000) }}",
    "str_join": "{{ ('x' * 1000000).join(['a', 'b', 'c']) }}",
    "str_replace": "{{ ('x' * 1000000).replace('x', 'yyyyyyyyyy') }}",
    "list_repetition": "{% set s = 'x' * 1000000 %}{{ [s] * 1000 }}",
    "string_repetition": "{{ 'x' * 400000000 }}",
    "big_integer": "{{ 2 ** 4096 * 2 ** 4096 }}",
    "concat": "{% set s = 'x' * 1000000 %}{{ s ~ s ~ s }}",
}


# the review of issue 23's sandbox: each escaped a 200 ms budget (CPU, memory, or both)
_NESTED = "{% set x = [0] * 1000 %}{% set y = [x] * 999 %}"
ESCAPES = {
    "batch": "{{ [1] | batch(3000000, 0) | list | length }}",
    "tojson_indent": "{{ [1, 2, 3] | tojson(3000000) }}",
    "bytes_center": "{{ 'x'.encode().center(3000000) }}",
    "bytes_ljust": "{{ 'x'.encode().ljust(3000000) }}",
    "bytes_zfill": "{{ '1'.encode().zfill(3000000) }}",
    "bytes_replace": "{{ ('x' * 100000).encode().replace('x'.encode(), ('y' * 30).encode()) }}",
    "bytes_join": "{{ ('x' * 1000000).encode().join(['a'.encode(), 'b'.encode(), 'c'.encode()]) }}",
    "bytes_expandtabs": "{{ ('\\t' * 1000).encode().expandtabs(3000) }}",
    "bytes_mod": "{{ '%3000000d'.encode() % 1 }}",
    "bytes_add": "{% set b = ('x' * 1000000).encode() %}{{ (b + b + b) | length }}",
    "translate": "{{ ('x' * 3000).translate({120: 'y' * 2000}) }}",
    "slice": "{{ [1] | slice(200000) | list | length }}",
    "sum": ("{% set x = [0] * 400 %}{% set y = [x] * 2400 %}"
            "{{ [y, y] | sum(start=[]) | sum(start=[]) | length }}"),
    "string": _NESTED + "{{ [y, y, y] | string | length }}",
    "pprint": _NESTED + "{{ [y, y, y] | pprint | length }}",
    "printed": _NESTED + "{{ [y, y, y] }}",
    "dict_view": _NESTED + "{{ dict(a=[y, y, y]).items() }}",
    "concat": _NESTED + "{{ ([y, y, y] ~ '') | length }}",
    "joined": _NESTED + "{{ [[y, y, y]] | join | length }}",
    "select_chain": ("{{ ('x' * 1000000) | reject('eq', 'y') | reject('eq', 'y') | "
                     "reject('eq', 'y') | reject('eq', 'y') | list | length }}"),
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_no_escape_from_the_budget(name: str) -> None:
    c = content(ESCAPES[name], timeout_ms=200)
    cpu = time.thread_time()
    tracemalloc.start()
    try:
        with pytest.raises(errors.RenderError) as caught:
            c.render(1, "a@example.com", "A")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    cpu = time.thread_time() - cpu
    # stopped before the value was made: not by the output check after it, not MemoryError
    assert getattr(caught.value, "budget", None) != "output", caught.value
    assert "MemoryError" not in str(caught.value)
    assert peak < 16 << 20, f"{name}: {peak / 1e6:.0f} MB allocated before the check"
    # generous (10x the budget, tracemalloc slows every allocation): a bound, not a benchmark
    assert cpu < 2.0, f"{name}: {cpu:.1f} s of CPU time"


def content(text: str, **budget: int) -> message.Content:
    return message.Content(str(uuid.uuid4()), "acct", "S", "news@example.com", text, None,
                           **budget)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_unbounded_templates_are_accepted_but_stopped_by_the_budget(name: str) -> None:
    template.check("text", BOMBS[name])  # syntax and names are fine: the budget decides
    with pytest.raises(errors.RenderError) as caught:
        content(BOMBS[name]).render(1, "a@example.com", "A")
    assert isinstance(caught.value, errors.RenderBudget) or "RecursionError" in str(caught.value)


def test_a_cpu_bound_render_names_the_cpu_budget() -> None:
    with pytest.raises(errors.RenderBudget) as caught:
        content(MACRO, timeout_ms=20).render(1, "a@example.com", "A")
    assert caught.value.budget == "cpu_time"
    assert "PGCAST_RENDER_TIMEOUT_MS" in str(caught.value)


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_nothing_allocates_before_its_check(name: str) -> None:
    c = content(ALLOCATORS[name])
    tracemalloc.start()
    try:
        with pytest.raises(errors.RenderError):
            c.render(1, "a@example.com", "A")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{name}: {peak / 1e6:.0f} MB allocated before the check"


def test_ordinary_templates_still_render() -> None:
    c = content("{% for t in contact.tags %}{{ t | upper }}{{ ', ' if not loop.last }}"
                "{% endfor %}|{{ ['a', 'b'] | join('-') }}|{{ 'ab' * 3 }}|{{ 2 ** 10 }}|"
                "{{ 'a-b' | replace('-', '+') }}|{{ contact.name ~ '!' }}|"
                "{{ lipsum(1, false, 3, 4) | length > 0 }}")
    m = c.render(1, "a@example.com", "Ann", {}, ["x", "y"])
    assert m.text == "X, Y|a-b|ababab|1024|a+b|Ann!|True"
