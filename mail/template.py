"""Merge-tag templates: Jinja2 in a budgeted sandbox (mail.sandbox), checked once.

A template is refused when it is accepted if a marketer must fix it (syntax, unknown names,
loops nested too deep, too many tags); every render then runs under a budget of CPU time,
steps, value sizes and output (MAX_PART), enforced while it runs: see mail.sandbox.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
import jinja2.sandbox

from pgcast.mail import errors, sandbox

MAX_PART = 1 << 20  # characters one rendered part (subject, text or html) may have
MAX_RANGE = sandbox.MAX_RANGE  # items one range() may produce
MAX_LOOP_DEPTH = 2  # nested {% for %} loops: at most MAX_RANGE ** 2 iterations of a body
MAX_SOURCE = 256 * 1024  # characters of one template's source
# tags ({{ }}, {% %}) in one template: parsing and compiling costs about 0.3 ms a tag, so
# this bounds the check at create and the compile in each worker (about 0.3 s)
MAX_TAGS = 1000
# the variables a template may use; preferences_url and web_url share the unsubscribe token
NAMES = ("contact", "broadcast", "unsubscribe_url", "preferences_url", "web_url")
_GLOBALS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace", "loop"})
TIMEOUT_ENV = "PGCAST_RENDER_TIMEOUT_MS"
MAX_TIMEOUT_MS = 60_000


def timeout_ms(raw: str | None = None) -> int:
    """PGCAST_RENDER_TIMEOUT_MS (CPU ms one message may take), checked; raises InvalidValue."""
    raw = os.environ.get(TIMEOUT_ENV) if raw is None else raw
    if raw is None or not raw.strip():
        return sandbox.DEFAULT_TIMEOUT_MS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_TIMEOUT_MS:
        raise errors.InvalidValue(TIMEOUT_ENV, f"must be an integer from 1 to {MAX_TIMEOUT_MS}")
    return value


TEXT_ENV = sandbox.environment(autoescape=False)  # subject and text: no escaping
HTML_ENV = sandbox.environment(autoescape=True)  # html: every value escaped


def _env(part: str) -> sandbox.Sandbox:
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


# the variables whose values pgcast makes per recipient from the message's token alone
LINKS = ("unsubscribe_url", "preferences_url", "web_url")
_SAME_FOR_ALL = frozenset({"id", "subject"})  # broadcast.id, broadcast.subject


def links_printed(part: str, source: str) -> int | None:
    """How many links (LINKS) a template prints when all it does is print text, constants,
    `broadcast.id`, `broadcast.subject` and the links themselves, each as a bare `{{ name }}`
    (no filter, test, call, condition, loop, assignment, macro or block; no `contact`). Such a
    template's output is the same for every recipient of a broadcast but for the links, each
    printed whole: rendered once with a stand-in token, it gives each recipient's output by
    putting the recipient's token in place of the stand-in (mail.message.Content.fill).
    None for any other template (and for one that does not parse)."""
    try:  # the parser alone: the sandbox's _parse would add its budget ticks to the tree
        tree = jinja2.parser.Parser(_env(part), source).parse()
    except jinja2.TemplateSyntaxError:
        return None
    printed = 0
    for node in tree.body:
        if not isinstance(node, jinja2.nodes.Output):
            return None
        for item in node.nodes:
            if isinstance(item, jinja2.nodes.TemplateData | jinja2.nodes.Const):
                continue
            if isinstance(item, jinja2.nodes.Name) and item.ctx == "load" and item.name in LINKS:
                printed += 1
            elif not (isinstance(item, jinja2.nodes.Getattr) and item.attr in _SAME_FOR_ALL
                      and isinstance(item.node, jinja2.nodes.Name)
                      and item.node.name == "broadcast" and item.node.ctx == "load"):
                return None
    return printed


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
        try:
            if sandbox.charging():  # the message's budget (Content.render)
                return sandbox.iterate(
                    root(context_class(env, {**base, **context}, None, blocks)), MAX_PART, part)
            with sandbox.charged():  # a part rendered on its own: a budget of its own
                return sandbox.iterate(
                    root(context_class(env, {**base, **context}, None, blocks)), MAX_PART, part)
        except errors.RenderError:
            raise
        except MemoryError:
            raise errors.RenderBudget("memory", "the render ran out of memory") from None
        except Exception as exc:  # noqa: BLE001 - any template fault is this recipient's
            raise errors.RenderError(f"{part}: {type(exc).__name__}: {exc}"[:500]) from None

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
