"""mail.template and mail.message without a database: checks, bounds, fallbacks, plain text."""

from __future__ import annotations

import uuid

import pytest

from pgcast.mail import errors, message, plaintext, template


def content(text: str | None, html: str | None = None, subject: str = "S") -> message.Content:
    return message.Content(str(uuid.uuid4()), "acct", subject, "news@example.com", text, html)


@pytest.mark.parametrize("source", [
    "{{ 'a' * 10000000 }}",
    "{{ 10000000 * 'a' }}",
    "{{ ['a'] * 10000000 }}",
    "{% for i in range(1000) %}{% for j in range(1000) %}{{ 'x' * 100 }}{% endfor %}{% endfor %}",
    "{{ range(10000000) | list }}",
    "{{ '%999999999s' % 'a' }}",
    "{{ '{:999999999}'.format('a') }}",
    "{{ 'a'.ljust(999999999) }}",
    "{{ 10 ** 100000000 }}",
])
def test_output_is_bounded_while_it_is_produced(source: str) -> None:
    template.check("text", source)  # accepted: the bound is the render's
    with pytest.raises(errors.RenderError):
        content(source).render(1, "a@example.com", "A")


@pytest.mark.parametrize("source", ["{{ 'x' | center(999999999) }}",
                                    "{{ 'x' | indent(999999999) }}"])
def test_width_filters_are_not_available(source: str) -> None:
    with pytest.raises(errors.TemplateInvalid, match="No filter named"):
        template.check("text", source)


def test_loops_nest_at_most_two_deep_and_names_are_known() -> None:
    template.check("text", "{% for a in range(3) %}{% for b in contact.tags %}{{ b }}"
                           "{% endfor %}{% endfor %}")
    with pytest.raises(errors.TemplateInvalid, match="nest"):
        template.check("text", "{% for a in range(2) %}{% for b in range(2) %}"
                               "{% for c in range(2) %}{% endfor %}{% endfor %}{% endfor %}")
    with pytest.raises(errors.TemplateInvalid) as caught:
        template.check("html", "<p>\n{{ user.name }}</p>")
    assert (caught.value.part, caught.value.line) == ("html", 2)


def test_fallbacks_missing_attributes_and_html_escaping() -> None:
    c = content("{{ contact.name | default('friend', true) }}|{{ contact.attributes.a.b }}|"
                "{{ contact.tags | join(',') }}",
                "<b>{{ contact.name }}</b>", subject="{{ broadcast.subject }}")
    m = c.render(1, "a@example.com", "<Ann & co>", {}, ["x", "y"])
    assert m.text == "<Ann & co>||x,y"
    assert m.html == "<b>&lt;Ann &amp; co&gt;</b>"
    assert m.subject == "{{ broadcast.subject }}"
    assert c.render(2, "b@example.com", None).text.startswith("friend||")


def test_html_only_gets_a_text_template_once_or_per_recipient_when_it_cannot() -> None:
    made = plaintext.template('<h1>Hi {{ contact.name }}</h1><a href="{{ unsubscribe_url }}">x</a>')
    assert made == "# Hi {{ contact.name }}\n\n[x]({{ unsubscribe_url }})\n"
    assert plaintext.template('<img alt="{{ contact.name }}" src="a.png">') is None
    fallback = content(None, '<p title="{{ contact.name }}">Hello {{ contact.name }}</p>')
    assert fallback.render(1, "a@example.com", "Zoë").text == "Hello Zoë\n"


@pytest.mark.timeout(60, method="thread")
def test_setting_tags_aside_is_linear_in_openers_without_a_closer() -> None:
    # valid Jinja: 256 KiB of `{#` inside a raw block; the old regex rescanned to the end
    # for each one (about 2 minutes); the scanner takes milliseconds
    source = "<p>{% raw %}" + "{#" * (128 << 10) + "{% endraw %}</p>"
    assert plaintext.template(source) is None  # a `{#` that could not be set aside whole
    tags: list[str] = []
    assert plaintext._park("a{{ x }}b{% if y %}c{# d #}{#e", tags) == \
        "aPGCASTJINJA000000XbPGCASTJINJA000001XcPGCASTJINJA000002X{#e"
    assert tags == ["{{ x }}", "{% if y %}", "{# d #}"]


def test_a_broken_stored_from_fails_every_recipient_with_the_reason() -> None:
    c = message.Content(str(uuid.uuid4()), "acct", "S", "a@example.com, b@example.com", "t",
                        None)
    with pytest.raises(errors.RenderError, match="exactly one address"):
        c.render(1, "x@example.com", "X")


def test_template_size_and_tag_count_are_bounded_before_parsing() -> None:
    with pytest.raises(errors.TemplateInvalid, match="at most 1000 tags"):
        template.check("html", "<p>{{ contact.name }}</p>" * 1001)
    with pytest.raises(errors.TemplateInvalid, match="characters"):
        template.check("text", "x" * (template.MAX_SOURCE + 1))
