"""Merge-tag templates: Jinja2 in an immutable sandbox, checked once, rendered within bounds.

The sandbox keeps templates away from Python internals but bounds neither output nor time:
`{{ 'a' * 10000000 }}` renders 10 MB. So output is counted while it is produced (generate(),
stopped at MAX_PART), the operators and filters that make a big string in one step refuse
to, and loops are bounded by what a template may loop over: range() stops at MAX_RANGE and
loops nest at most MAX_LOOP_DEPTH deep (checked when the template is accepted). A render in
a thread cannot be interrupted, so a clock check after the fact would be no bound at all.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.meta
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox

from mail import errors

MAX_PART = 1 << 20  # characters one rendered part (subject, text or html) may have
MAX_RANGE = 1000  # items one range() may produce
MAX_LOOP_DEPTH = 2  # nested {% for %} loops: at most MAX_RANGE ** 2 iterations of a body
MAX_SOURCE = 256 * 1024  # characters of one template's source
# tags ({{ }}, {% %}) in one template: parsing and compiling costs about 0.3 ms a tag, so
# this bounds the check at create and the compile in each worker (about 0.3 s)
MAX_TAGS = 1000
NAMES = ("contact", "broadcast", "unsubscribe_url")  # the variables a template may use
_GLOBALS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace", "loop"})
# filters that build a long string from a short one and a number; gone, not bounded
_DROPPED_FILTERS = ("center", "indent", "wordwrap", "format", "filesizeformat", "lipsum")


def _bounded_range(*args: int) -> range:
    """range(), refusing more than MAX_RANGE items."""
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise jinja2.exceptions.SecurityError(f"range() is limited to {MAX_RANGE} items")
    return rng


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple | bytes) else 0


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox, with bounded repetition and no str.format."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: jinja2.runtime.Context, operator_name: str,
                   left: Any, right: Any) -> Any:
        """`*`, `**` and `%` within MAX_PART."""
        if operator_name == "*":
            count = right if _size(left) else left
            unit = max(_size(left), _size(right))
            if unit and isinstance(count, int) and unit * count > MAX_PART:
                raise jinja2.exceptions.SecurityError("a repeated string is too long")
            return operator.mul(left, right)
        if operator_name == "**":
            if isinstance(right, int) and isinstance(left, int) and abs(right) > 64:
                raise jinja2.exceptions.SecurityError("the exponent is too large")
            return operator.pow(left, right)
        # '%' on a string formats it: a width such as %999999999s is a huge string
        if isinstance(left, str):
            raise jinja2.exceptions.SecurityError("string formatting with % is not available")
        return operator.mod(left, right)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        """No str.format / format_map: a width makes any string huge."""
        if isinstance(obj, str) and attr in ("format", "format_map", "center", "ljust",
                                             "rjust", "zfill", "expandtabs"):
            return False
        return bool(super().is_safe_attribute(obj, attr, value))


def _environment(autoescape: bool) -> _Sandbox:
    env = _Sandbox(autoescape=autoescape, undefined=jinja2.ChainableUndefined,
                   keep_trailing_newline=True)
    env.globals["range"] = _bounded_range
    for name in _DROPPED_FILTERS:
        env.filters.pop(name, None)
    return env


TEXT_ENV = _environment(autoescape=False)  # subject and text: no escaping
HTML_ENV = _environment(autoescape=True)  # html: every value escaped


def _env(part: str) -> _Sandbox:
    return HTML_ENV if part == "html" else TEXT_ENV


def _loop_depth(node: jinja2.nodes.Node, depth: int = 0) -> int:
    deepest = depth
    for child in node.iter_child_nodes():
        inner = depth + 1 if isinstance(child, jinja2.nodes.For) else depth
        deepest = max(deepest, inner, _loop_depth(child, inner))
    return deepest


def check(part: str, source: str) -> None:
    """Refuse a template a marketer must fix (syntax, unknown name, deep loops): TemplateInvalid."""
    if len(source) > MAX_SOURCE:
        raise errors.TemplateInvalid(part, None, f"at most {MAX_SOURCE} characters")
    if source.count("{{") + source.count("{%") > MAX_TAGS:
        raise errors.TemplateInvalid(part, None, f"at most {MAX_TAGS} tags ({{{{ }}}} and "
                                                 "{% %})")
    env = _env(part)
    try:
        tree = env.parse(source)
        # compiles the template too: an unknown filter or test is refused here
        undeclared = jinja2.meta.find_undeclared_variables(tree)
    except jinja2.TemplateSyntaxError as exc:
        raise errors.TemplateInvalid(part, exc.lineno, exc.message or "syntax error") from None
    unknown = undeclared - set(NAMES) - _GLOBALS
    if unknown:
        first = sorted(unknown)[0]
        line = next((n.lineno for n in tree.find_all(jinja2.nodes.Name) if n.name == first),
                    None)
        raise errors.TemplateInvalid(
            part, line, f"unknown variable {first!r}; a template can use "
                        f"{', '.join(NAMES)} (for example {{{{ contact.name }}}})")
    if _loop_depth(tree) > MAX_LOOP_DEPTH:
        raise errors.TemplateInvalid(part, None,
                                     f"loops may nest at most {MAX_LOOP_DEPTH} deep")


def uses(source: str, name: str) -> bool:
    """Whether a (valid) template reads the variable `name`."""
    try:
        tree = TEXT_ENV.parse(source)
    except jinja2.TemplateSyntaxError:
        return False
    return any(n.name == name for n in tree.find_all(jinja2.nodes.Name))


Renderer = Callable[[dict[str, Any]], str]


def compile_part(part: str, source: str) -> Renderer:
    """A compiled template: renders a context within MAX_PART, or raises RenderError."""
    try:
        template = _env(part).from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        reason = f"{part}, line {exc.lineno}: {exc.message}"
        raise errors.RenderError(reason) from None
    if "{" not in source:  # nothing to render: the source is the output
        return lambda context: source
    # what Template.generate() does, without its per-call setup (new_context copies the
    # globals and their key set for every message: half the cost of a small template):
    # the globals are merged here once, and each message gets a bare Context
    root = template.root_render_func
    base = dict(template.globals)
    env, blocks = template.environment, template.blocks
    context_class = jinja2.runtime.Context

    def render(context: dict[str, Any]) -> str:
        out: list[str] = []
        append = out.append
        size = 0
        try:
            for chunk in root(context_class(env, {**base, **context}, None, blocks)):
                size += len(chunk)
                if size > MAX_PART:
                    raise errors.RenderError(f"{part}: the rendered {part} is longer than "
                                             f"{MAX_PART} characters")
                append(chunk)
        except errors.RenderError:
            raise
        except Exception as exc:  # noqa: BLE001 - any template fault is this recipient's
            raise errors.RenderError(f"{part}: {type(exc).__name__}: {exc}"[:500]) from None
        return "".join(out)

    return render


def check_broadcast(subject: str, text: str | None, html: str | None) -> None:
    """Check a broadcast's three templates; raises TemplateInvalid."""
    for part, source in (("subject", subject), ("text", text), ("html", html)):
        if source is not None:
            check(part, source)


NO_UNSUBSCRIBE_LINK = ("neither text nor html shows {{ unsubscribe_url }}: Gmail and Yahoo "
                       "expect a visible unsubscribe link in bulk mail")


def warnings(text: str | None, html: str | None) -> list[str]:
    """What a marketer should fix, though the broadcast can be sent as it is."""
    if any(source and uses(source, "unsubscribe_url") for source in (text, html)):
        return []
    return [NO_UNSUBSCRIBE_LINK]
