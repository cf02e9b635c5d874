"""Jinja's immutable sandbox with a budget: every render is stopped while it runs, not after.

A render is charged as it goes. Every loop iteration (its body and its `if` filter), every
macro or `call` block entered, every filter, call and intercepted operator ticks the budget
of the render in progress (a thread-local Budget); every CHECK_EVERY ticks the thread's CPU
time is compared with the render's deadline (set at the first look), and past MAX_OPS ticks
the render stops whatever the clock says. The ticks are inserted into the template's tree
before it is compiled (`_parse`), so recursive macros, `{% for ... recursive %}` and nested
loops are all counted. What a single step can allocate is capped before it allocates:
integers (MAX_INT_BITS), strings and lists built by `*`, `+`, `~`, `join` and `replace`
(MAX_VALUE); `str.format`/`format_map`, `translate`, `encode` (no bytes: every bytes method
would need its own bound) and the width filters are not available; `lipsum`, `batch`,
`slice`, `sum` and `tojson`'s indent are bounded; a container becomes text (printed, `~`,
`string`, `pprint`, `join`, ...) only when an estimate of its text, taken first, is within
MAX_VALUE; every filter and test is a step. So every step is bounded and the number of steps
is bounded: a render cannot run long or grow large. The render pool (mail.renderpool) adds
the hard limits of a process around it.
"""

from __future__ import annotations

import functools
import operator
import threading
import time
from collections.abc import Callable, ItemsView, Iterator, MappingView
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.exceptions
import jinja2.filters
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils

from pgcast.mail import errors

DEFAULT_TIMEOUT_MS = 200  # CPU milliseconds one message may take (PGCAST_RENDER_TIMEOUT_MS)
MAX_OPS = 1_000_000  # ticks one message may take, whatever the clock says
CHECK_EVERY = 64  # ticks between two looks at the CPU clock (one look: about 0.3 us)
MAX_VALUE = 1 << 20  # characters (or items) one string or list built by a template may have
MAX_INT_BITS = 4096  # bits of an integer a template may compute
MAX_LIPSUM = 5  # paragraphs lipsum() may make
_TICK = "_pgcast_tick"  # the filter the inserted ticks call
_PASS = "_pgcast_pass"  # the same, returning True (inside a loop's `if` filter)
# str methods that build a long string from a short one and a number (or a long separator)
_UNSAFE_STR = frozenset({"format", "format_map", "center", "ljust", "rjust", "zfill",
                         "expandtabs", "join", "replace", "translate", "encode"})
MAX_INDENT = 8  # spaces tojson may indent by
# filters that turn their value (or an argument) into text: a container's text is estimated
# before it is made (measure)
_STRINGIFYING = frozenset({"string", "pprint", "e", "escape", "forceescape", "safe", "trim",
                           "upper", "lower", "title", "capitalize", "truncate", "urlencode",
                           "striptags", "wordcount", "urlize", "xmlattr", "reverse", "int",
                           "float"})
# what repr shows item by item (a dict's views too: `d.items()` prints every item)
_CONTAINERS = (list, tuple, dict, set, frozenset, MappingView,
               jinja2.utils.Namespace)


class Budget:
    """What one render may still spend: ticks and CPU time (this thread's clock)."""

    __slots__ = ("deadline", "ops", "timeout_ms")

    def __init__(self, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> None:
        self.timeout_ms = timeout_ms
        # the clock starts at the first look (CHECK_EVERY steps in): reading a thread's CPU
        # clock is a system call that would cost a small message a third of its render, and
        # what runs before it is at most CHECK_EVERY bounded steps
        self.deadline: float | None = None
        self.ops = 0

    def tick(self) -> None:
        """One step; stops the render past its budget (RenderBudget)."""
        self.ops += 1
        if self.ops % CHECK_EVERY == 0:
            if self.ops > MAX_OPS:
                raise errors.RenderBudget("operations", f"more than {MAX_OPS} steps")
            now = time.thread_time()
            if self.deadline is None:
                self.deadline = now + self.timeout_ms / 1000
            elif now > self.deadline:
                raise errors.RenderBudget("cpu_time", f"more than {self.timeout_ms} ms of "
                                                      "CPU time (PGCAST_RENDER_TIMEOUT_MS)")


_local = threading.local()


class charged:  # noqa: N801 - used as a context manager, like a function
    """`with charged(timeout_ms):` one message's render runs under a fresh budget (a render
    already charged on this thread keeps its own)."""

    def __init__(self, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> None:
        self.timeout_ms = timeout_ms
        self.outer: Budget | None = None

    def __enter__(self) -> Budget:
        outer: Budget | None = getattr(_local, "budget", None)
        self.outer = outer
        if outer is not None:
            return outer
        budget = _local.budget = Budget(self.timeout_ms)
        return budget

    def __exit__(self, *exc: object) -> None:
        _local.budget = self.outer


def charging() -> bool:
    """Whether a render on this thread is charged to a budget already."""
    return getattr(_local, "budget", None) is not None


def tick() -> None:
    """Charge one step to the render running on this thread (none: compile-time folding of
    constants, bounded by the source)."""
    budget: Budget | None = getattr(_local, "budget", None)
    if budget is not None:
        budget.tick()


@jinja2.pass_context  # never folded into a constant at compile time
def _tick_filter(context: jinja2.runtime.Context, value: Any) -> Any:
    tick()
    return value


def weight(value: Any) -> int:
    """About how many characters a value becomes (strings, and lists of them, one level)."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, list | tuple):
        return len(value) + sum(len(v) for v in value if isinstance(v, str | bytes | list | tuple))
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 3  # about its decimal digits
    return 0


def refuse_big(size: int, what: str) -> None:
    """A value of `size` would be over MAX_VALUE: RenderBudget before it is made."""
    if size > MAX_VALUE:
        raise errors.RenderBudget("memory", f"{what} would be too long (over {MAX_VALUE} "
                                            "characters)")


def _children(value: Any) -> Iterator[Any]:
    if isinstance(value, dict | ItemsView):
        for key, item in (value.items() if isinstance(value, dict) else value):
            yield key
            yield item
    elif isinstance(value, jinja2.utils.Namespace):
        yield from _children(value._Namespace__attrs)  # what its repr shows
    else:
        yield from value


def measure(value: Any, what: str, indent: int = 0) -> None:
    """Refuse (RenderBudget) a value whose text (str, repr, JSON) would be over MAX_VALUE
    characters, before it is made; a walk of at most MAX_VALUE / 2 items, ticked."""
    if not isinstance(value, _CONTAINERS):
        return
    size = 0
    seen = 0
    stack: list[tuple[Iterator[Any], int]] = [(iter((value,)), 0)]
    while stack:
        items, depth = stack[-1]
        item = next(items, _END)
        if item is _END:
            stack.pop()
            continue
        seen += 1
        if seen % CHECK_EVERY == 0:
            tick()
        size += 2 + indent * depth  # a separator or brackets, and a line's indent
        if isinstance(item, str | bytes | bytearray):
            size += len(item)
        elif isinstance(item, int):
            size += item.bit_length() // 3
        elif isinstance(item, _CONTAINERS):
            stack.append((_children(item), depth + 1))
        else:
            size += 64  # a float, an undefined, a macro: a short repr
        if size > MAX_VALUE:
            raise errors.RenderBudget("memory", f"{what} would be too long (over "
                                                f"{MAX_VALUE} characters)")


_END = object()


def _measured(value: Any) -> Any:
    """The environment's finalize: a printed container is measured before it is text."""
    if type(value) is not str:
        measure(value, "a printed value")
    return value


def _int_bits(value: Any) -> int:
    return value.bit_length() if isinstance(value, int) else 0


def _checked_int(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise errors.RenderBudget("memory", f"an integer over {MAX_INT_BITS} bits")
    return value


def _mul(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int):
        if _int_bits(left) + _int_bits(right) > MAX_INT_BITS:
            raise errors.RenderBudget("memory", f"an integer over {MAX_INT_BITS} bits")
        return left * right
    for unit, times in ((left, right), (right, left)):
        if isinstance(times, int) and isinstance(unit, str | bytes | list | tuple):
            refuse_big(weight(unit) * max(times, 0), "a repeated value")
    return operator.mul(left, right)


def _pow(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
            (right > MAX_INT_BITS or _int_bits(left) * right > MAX_INT_BITS):
        raise errors.RenderBudget("memory", f"an integer over {MAX_INT_BITS} bits")
    return operator.pow(left, right)


def _add(left: Any, right: Any) -> Any:
    if isinstance(left, str | bytes | bytearray | list | tuple) and \
            isinstance(right, str | bytes | bytearray | list | tuple):
        refuse_big(weight(left) + weight(right), "a joined value")
    return _checked_int(operator.add(left, right))


def _mod(left: Any, right: Any) -> Any:
    if isinstance(left, str | bytes | bytearray):  # '%999999999s' % x is a huge string
        raise jinja2.exceptions.SecurityError("string formatting with % is not available")
    return operator.mod(left, right)


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {"*": _mul, "**": _pow, "+": _add, "%": _mod}


def concat(join: Callable[[Any], str], values: tuple[Any, ...]) -> str:
    """`a ~ b ~ ...`: each value as a string, refused before the join when too long."""
    tick()
    for v in values:
        measure(v, "a joined string")
    parts = [v if isinstance(v, str) else str(v) for v in values]
    refuse_big(sum(len(p) for p in parts), "a joined string")
    return join(parts)


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """Jinja's code generator, with `~` going through `concat` (bounded before it joins)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        """`environment.concat(join, (a, b, ...))` instead of `join((a, b, ...))`."""
        self.write("environment.pgcast_concat(")
        if frame.eval_ctx.volatile:
            self.write("(markup_join if context.eval_ctx.volatile else str_join)")
        else:
            self.write("markup_join" if frame.eval_ctx.autoescape else "str_join")
        self.write(", (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _tick_node(lineno: int, name: str = _TICK) -> jinja2.nodes.Filter:
    value = jinja2.nodes.Const(True if name == _PASS else None, lineno=lineno)
    return jinja2.nodes.Filter(value, name, [], [], None, None, lineno=lineno)


def _instrument(tree: jinja2.nodes.Template) -> jinja2.nodes.Template:
    """Ticks at the top of every loop body, loop filter, macro and call block."""
    for node in tree.find_all((jinja2.nodes.For, jinja2.nodes.Macro, jinja2.nodes.CallBlock)):
        assert isinstance(node, jinja2.nodes.For | jinja2.nodes.Macro | jinja2.nodes.CallBlock)
        node.body.insert(0, jinja2.nodes.ExprStmt(_tick_node(node.lineno), lineno=node.lineno))
        if isinstance(node, jinja2.nodes.For) and node.test is not None:
            node.test = jinja2.nodes.And(_tick_node(node.lineno, _PASS), node.test,
                                         lineno=node.lineno)
    return tree


def _ticking(f: Callable[..., Any], stringifying: bool = False) -> Callable[..., Any]:
    @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
    def filtered(*args: Any, **kwargs: Any) -> Any:
        tick()
        if stringifying:
            for arg in (*args, *kwargs.values()):
                measure(arg, "a value made text")
        return f(*args, **kwargs)

    return filtered


REPLACE = jinja2.filters.FILTERS["replace"]
JOIN = jinja2.filters.FILTERS["join"]
BATCH = jinja2.filters.FILTERS["batch"]
SLICE = jinja2.filters.FILTERS["slice"]
TOJSON = jinja2.filters.FILTERS["tojson"]


@jinja2.pass_eval_context
def _replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> Any:
    """`replace`, refused before it runs when the result would be too long."""
    for value in (s, old, new):
        measure(value, "a replaced string")
    text, old_s, new_s = str(s), str(old), str(new)
    hits = text.count(old_s) if old_s else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    refuse_big(len(text) + hits * max(0, len(new_s) - len(old_s)), "a replaced string")
    return REPLACE(eval_ctx, s, old, new, count)


@jinja2.pass_eval_context
def _join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> Any:
    """`join`, refused before it runs when the result would be too long."""
    items = list(value)
    measure(items, "a joined string")
    refuse_big(len(items) * len(str(d)) + sum(weight(i) for i in items), "a joined string")
    return JOIN(eval_ctx, items, d, attribute)


def _batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
    """`batch`, at most MAX_RANGE items a batch (a fill makes every batch that long)."""
    if not 0 < int(linecount) <= MAX_RANGE:
        raise errors.RenderBudget("memory", f"batch() makes batches of at most {MAX_RANGE} "
                                            "items")
    return BATCH(value, linecount, fill_with)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Any:
    """`slice`, at most MAX_RANGE slices (each a list, even an empty one)."""
    if not 0 < int(slices) <= MAX_RANGE:
        raise errors.RenderBudget("memory", f"slice() makes at most {MAX_RANGE} slices")
    return SLICE(value, slices, fill_with)


@jinja2.pass_eval_context
def _tojson(eval_ctx: Any, value: Any, indent: int | None = None) -> Any:
    """`tojson`, indenting by at most MAX_INDENT, its text estimated before it is made."""
    if indent is not None and not 0 <= int(indent) <= MAX_INDENT:
        raise errors.RenderBudget("memory", f"tojson() indents by at most {MAX_INDENT}")
    measure(value, "a JSON value", indent or 0)
    return TOJSON(eval_ctx, value, indent)


@jinja2.pass_environment
def _sum(env: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    """`sum`, a step per item; lists and tuples joined in place within MAX_VALUE items (the
    built-in copies the whole sum at every item: quadratic)."""
    if attribute is not None:
        iterable = map(jinja2.filters.make_attrgetter(env, attribute), iterable)
    if isinstance(start, list | tuple):
        made = list(start)
        for item in iterable:
            tick()
            if type(item) is not type(start):
                raise TypeError(f"can only add {type(start).__name__} to "
                                f"{type(start).__name__}")
            refuse_big(len(made) + len(item), "a sum")
            made.extend(item)
        return made if isinstance(start, list) else tuple(made)
    total = start
    for item in iterable:
        tick()
        total = _add(total, item)
    return total


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    """lipsum(), at most MAX_LIPSUM paragraphs of at most 100 words."""
    if not (0 <= n <= MAX_LIPSUM and 0 < min <= max <= 100):
        raise errors.RenderBudget("memory", f"lipsum() makes at most {MAX_LIPSUM} "
                                            "paragraphs of at most 100 words")
    return str(jinja2.utils.generate_lorem_ipsum(n, html, min, max))


def _bounded_range(*args: int) -> range:
    """range(), refusing more than MAX_RANGE items."""
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise jinja2.exceptions.SecurityError(f"range() is limited to {MAX_RANGE} items")
    return rng


MAX_RANGE = 1000  # items one range() may produce


class Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox, charged to a Budget and bounded in every step's size."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset(_BINOPS)

    def _parse(self, source: str, name: str | None, filename: str | None) -> Any:
        return _instrument(super()._parse(source, name, filename))

    def call_binop(self, context: jinja2.runtime.Context, operator_name: str,
                   left: Any, right: Any) -> Any:
        """`*`, `**`, `+`, `%`: ticked, and refused before they make a value too large."""
        tick()
        return _BINOPS[operator_name](left, right)

    def call(__self, __context: jinja2.runtime.Context,  # noqa: N805 - jinja's signature
             __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Every call is a step."""
        tick()
        return _checked_int(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """str.format / format_map are never available (a width makes any string huge)."""
        if jinja2.sandbox.SandboxedEnvironment.wrap_str_format(self, value) is None:
            return None

        def refused(*args: Any, **kwargs: Any) -> str:
            raise jinja2.exceptions.SecurityError("str.format is not available")

        return refused

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        """No str method that builds a long string from a number or a separator."""
        if isinstance(obj, str) and attr in _UNSAFE_STR:
            return False
        if isinstance(obj, bytes | bytearray | memoryview):  # none is bounded (see encode)
            return False
        return bool(super().is_safe_attribute(obj, attr, value))

    def pgcast_concat(self, join: Callable[[Any], str], values: tuple[Any, ...]) -> str:
        """The bounded `~` (see _CodeGenerator)."""
        return concat(join, values)


# filters that build a long string from a short one and a number; gone, not bounded
DROPPED_FILTERS = ("center", "indent", "wordwrap", "format", "filesizeformat")


def environment(autoescape: bool) -> Sandbox:
    """A budgeted sandbox: bounded filters and globals, every filter a step."""
    env = Sandbox(autoescape=autoescape, undefined=jinja2.ChainableUndefined,
                  keep_trailing_newline=True, finalize=_measured)
    env.globals["range"] = _bounded_range
    env.globals["lipsum"] = _lipsum
    for name in DROPPED_FILTERS:
        env.filters.pop(name, None)
    env.filters["replace"] = _replace
    env.filters["join"] = _join
    env.filters["batch"] = _batch
    env.filters["slice"] = _slice
    env.filters["tojson"] = _tojson
    env.filters["sum"] = _sum
    env.filters = {name: _ticking(f, name in _STRINGIFYING) for name, f in env.filters.items()}
    # a test is a step too: `select`/`reject` call one per item
    tests: dict[str, Any] = env.tests
    env.tests = {name: _ticking(f) for name, f in tests.items()}
    env.filters[_TICK] = _tick_filter
    env.filters[_PASS] = _tick_filter
    return env


def iterate(chunks: Iterator[str], limit: int, part: str) -> str:
    """Join a render's chunks, stopping as soon as they pass `limit` characters."""
    out: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise errors.RenderBudget("output", f"the rendered {part} is too long (over "
                                                f"{limit} characters)")
        out.append(chunk)
    return "".join(out)
