"""Messages filled from a skeleton (issue 32): byte for byte what the render pool renders, for
every content whose templates print nothing per recipient but their links, and never for
any other; in real render processes."""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest

from pgcast.mail import message, renderpool, template, unsubscribe
from pgcast.worker import dispatch, render

KEYS = unsubscribe.Keys(("k" * 40,))
LINKS = ("{{ unsubscribe_url }}", "{{ preferences_url }}", "{{ web_url }}")
# (subject, text, html, Content keyword arguments): every content here can be filled
FILLABLE = [
    ("Plain", "Hello, this is a benchmark.", None, {}),
    ("Links {{ broadcast.subject }}", "Bye: {{ unsubscribe_url }}\nPrefs {{preferences_url}}\n"
     "Web {{- web_url -}}!", None, {}),
    ("=?utf-8?q?Bcc:_x?= {{ unsubscribe_url }}", "ü {{ broadcast.id }} {{ 'const' }}",
     "<p>Grüße & <a href=\"{{ unsubscribe_url }}\">leave</a> {{ web_url }}</p>", {}),
    ("HTML only", None, "<h1>Hi</h1><p>{{ broadcast.subject }}</p><a href=\"{{ "
     "unsubscribe_url }}\">Unsubscribe</a><ul><li>{{ preferences_url }}</li></ul>", {}),
    ("Raw {% raw %}{{ contact.name }}{% endraw %}", "{# a comment #}x" * 3 + LINKS[0],
     "<b>{% raw %}{{ x }}{% endraw %}</b>", {}),
    ("Test send " + LINKS[2], LINKS[0], "<a href='" + LINKS[1] + "'>p</a>", {"test": True}),
    ("Escaped base", LINKS[0], "<a href=\"{{ unsubscribe_url }}\">x</a>{{ web_url }}",
     {"base_url": "https://mail.example.com/a&b'c"}),
    ("Long " + "x" * 600, "\r\nline\x00\x85" + LINKS[0] * 50, None, {}),
]
NOT_FILLABLE = [
    ("Hi {{ contact.name }}", "x", None, {}),
    ("S", "{{ unsubscribe_url | upper }}", None, {}),
    ("S", "{% if contact.tags %}t{% endif %}{{ unsubscribe_url }}", None, {}),
    ("S", "{% for i in range(2) %}{{ unsubscribe_url }}{% endfor %}", None, {}),
    ("S", "{% set web_url = 'x' %}{{ web_url }}", None, {}),
    ("S", "{{ lipsum(1) }}", None, {}),
    ("S", "{{ broadcast }}", None, {}),
    ("S", "<a href=\"{{ unsubscribe_url }}\">x</a>", "<a href=\"{{ unsubscribe_url }}\">x</a>",
     {"track": "aggregate"}),
    # an html whose tags cannot be set aside: its text is converted per recipient
    ("S", None, "<img alt=\"{{ unsubscribe_url }}\">", {}),
]
# (contact id, address, name): hostile names and addresses (tests/acceptance/test_hostile_rows)
RECIPIENTS = [
    (1, "bob@example.com", "Bob\r\nBcc: x@y"),
    (2, "üser@example.com", "Jürgen"),
    (3, "plain@example.com", None),
    (4, "q@example.com", 'Say "hi" \\ there'),
    (5, "enc@example.com", "=?utf-8?b?QmNjOiB4QHk=?="),
    (6, "long@example.com", "N" * 700),
    (7, "user@bücher.de", "IDNA"),
    (8, "not an address", "Nobody"),
    (9, " spaced@example.com ", ""),
    (10, "\"a b\"@example.com", "Quoted"),
    (2**62, "big@example.com", "Big id"),
    (11, "two@at@example.com", "Two"),
    (12, "simple@example.com", "User 12"),
    (13, "x@example.com", "x=?"),
    (14, "Case.Mixed+tag@Example.COM", "~"),
]


def content(subject: str, text: str | None, html: str | None, extra: dict[str, object],
            ) -> message.Content:
    kwargs: dict[str, object] = {"keys": KEYS, **extra}
    return message.Content(str(uuid.uuid4()), "acct", subject, "Sender <s@example.com>", text,
                           html, **kwargs)  # type: ignore[arg-type]


def wire(made: message.Message) -> bytes:
    """The message's bytes, its MIME boundaries (random per call) named."""
    raw = message.to_rfc5322(made, "<m@x>", "Mon, 07 Dec 2026 19:00:00 +0000")
    return re.sub(rb"={15}\d+==", b"BOUNDARY", raw)


def token_of(made: message.Message) -> str:
    return made.headers["List-Unsubscribe"].rsplit("/", 1)[1].rstrip(">")


@pytest.mark.parametrize("case", FILLABLE)
def test_a_filled_message_is_the_rendered_message_byte_for_byte(
        case: tuple[str, str | None, str | None, dict[str, object]]) -> None:
    c = content(*case)
    assert c.links_printed() is not None
    made = c.skeleton(c.stand_in())  # what a render process does
    assert c.usable(made)
    for cid, address, name in RECIPIENTS:
        try:
            expected: message.Message | str = c.render(cid, address, name)
        except Exception as exc:  # noqa: BLE001 - the reason is what must match
            expected = str(exc)
        try:
            filled: message.Message | str = c.fill(made, cid, address, name)
        except Exception as exc:  # noqa: BLE001
            filled = str(exc)
        if isinstance(expected, str) or isinstance(filled, str):
            assert filled == expected
            continue
        token = token_of(filled)
        assert KEYS.read(token).contact_id == cid
        again = c.render(cid, address, name, token=token)  # the same token, rendered
        assert filled == again
        assert wire(filled) == wire(again)


@pytest.mark.parametrize("case", NOT_FILLABLE)
def test_a_template_that_does_more_than_print_its_links_is_rendered_per_message(
        case: tuple[str, str | None, str | None, dict[str, object]]) -> None:
    assert content(*case).links_printed() is None


def test_a_skeleton_whose_marker_is_not_where_the_links_are_is_not_used() -> None:
    c = content("S", "a " + LINKS[0], None, {})
    made = c.skeleton(c.stand_in())
    assert c.usable(made)
    # the marker printed once more than the template prints links (or a marker of another
    # length): not a skeleton of this content
    wrong = message.Skeleton(made.marker, message.Message(
        0, "x", "y", made.message.subject, (made.message.text or "") + made.marker, None))
    assert not c.usable(wrong)
    assert not c.usable(message.Skeleton(made.marker[:-1], made.message))


def test_links_printed_counts_each_bare_link() -> None:
    assert template.links_printed("text", "a {{ unsubscribe_url }}{{ web_url }}") == 2
    assert template.links_printed("html", "{{ broadcast.subject }} {{ 'x' }}") == 0
    assert template.links_printed("text", "{{ broadcast.nope }}") is None
    assert template.links_printed("text", "{% if x %}") is None  # does not parse


def normalised(result: object) -> object:
    """A message with its token (random per message) named: compared across the two paths."""
    if isinstance(result, message.Message):
        token = token_of(result)
        assert KEYS.read(token).contact_id == result.contact_id
        return repr(result).replace(token, "TOKEN")
    return result


def test_the_builder_fills_what_the_pool_renders_for_hostile_rows() -> None:
    pool = renderpool.RenderPool(processes=2, share=2)
    handed = [dispatch.Recipient(cid, address, name) for cid, address, name in RECIPIENTS]
    builder = dispatch.Builder(pool)

    async def both(c: message.Content) -> tuple[list[object], list[object], object]:
        filled = await builder.build(c, handed)
        made = await builder.skeleton(c)
        rendered = await render.render_many(c, [
            (r.contact_id, r.email, r.name, None, None, None) for r in handed], 0, pool)
        return list(filled), list(rendered), made

    try:
        for case in FILLABLE:
            c = content(*case)
            filled, rendered, made = asyncio.run(both(c))
            assert isinstance(made, message.Skeleton)  # the fill path was taken
            built = [normalised(f) if isinstance(f, message.Message) else f.error
                     for f in filled]
            want = [normalised(r) if isinstance(r, message.Message) else
                    dispatch.cannot_build(cid, r.reason).error
                    for (cid, _, _), r in zip(RECIPIENTS, rendered, strict=True)]
            assert built == want
            assert any(isinstance(f, dispatch.Outcome) for f in filled)  # "not an address"
        for case in NOT_FILLABLE[:2]:
            _, _, made = asyncio.run(both(content(*case)))
            assert made is None
    finally:
        pool.close()


def test_a_content_reads_contact_only_when_a_template_names_it() -> None:
    assert not content(*FILLABLE[2]).reads_contact()
    assert not content("S", "{% if broadcast.id %}{{ unsubscribe_url }}{% endif %}", None,
                       {}).reads_contact()
    assert content("S", "x", "<p>{{ contact.attributes.plan }}</p>", {}).reads_contact()
    assert content("Hi {{ contact.name }}", "x", None, {}).reads_contact()
    assert content("S", "{{ contact['tags'] | join(',') }}", None, {}).reads_contact()


def test_a_simple_address_is_its_own_addr_spec() -> None:
    """addr_spec's fast path returns what email.headerregistry.Address gives for every
    character a simple address may have, at both ends of the local part and the domain."""
    import email.headerregistry

    local_chars = "azAZ09.!#$%&'*+/=?^_`{|}~-"
    domain_chars = "azAZ09.-"
    for lc in local_chars:
        for local in (lc, f"{lc}x", f"x{lc}", f"x{lc}{lc}y"):
            for dc in domain_chars:
                domain = f"{dc}b{dc}"
                address = f"{local}@{domain}"
                assert message.addr_spec(address) == email.headerregistry.Address(
                    username=local, domain=domain).addr_spec


class FakePool:
    """A render pool whose skeleton render fails (or is not rendered); messages are rendered
    in this process as a render process would."""

    def __init__(self, skeleton: renderpool.Failure) -> None:
        self.failure = skeleton
        self.skeleton_jobs = 0

    async def run(self, account: str, kind: str, spec: object, items: list[object],
                  stop_after: int = 0) -> list[object]:
        if kind == "skeleton":
            self.skeleton_jobs += 1
            return [self.failure]
        assert kind == "messages"
        out: list[object] = []
        for cid, address, name, attributes, tags, deliver_to in items:  # type: ignore[misc]
            out.append(self.content.render(cid, address, name, attributes, tags, deliver_to))
        return out

    content: message.Content


@pytest.mark.parametrize(("failure", "asked"), [
    (renderpool.Failure("render budget exceeded (memory)", "memory"), 1),
    (renderpool.Failure("not rendered: the render process could not start", None, True), 2)])
def test_a_skeleton_that_cannot_be_made_leaves_the_messages_to_the_pool(
        failure: renderpool.Failure, asked: int) -> None:
    pool = FakePool(failure)
    c = content(*FILLABLE[1])
    pool.content = c
    builder = dispatch.Builder(pool)  # type: ignore[arg-type]
    sendable = (RECIPIENTS[0], RECIPIENTS[2], RECIPIENTS[3])
    handed = [dispatch.Recipient(cid, address, name) for cid, address, name in sendable]

    async def twice() -> list[list[object]]:
        return [list(await builder.build(c, handed)) for _ in range(2)]

    for built in asyncio.run(twice()):
        assert [normalised(b) for b in built] == [
            normalised(c.render(r.contact_id, r.email, r.name)) for r in handed]
    # a failed render is not asked again; one that was not rendered is, on the next group
    assert pool.skeleton_jobs == asked
