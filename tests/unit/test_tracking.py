"""Open and click tracking without a database: tokens, the links a template writes, the
rewriting of a message, and the machine heuristics (issue 29)."""

from __future__ import annotations

import datetime as dt
import html
import re
import time
import uuid

import pytest

from pgcast.api import tracking_events
from pgcast.mail import message, tracking, unsubscribe

BASE = "https://mail.example.org"
KEYS = unsubscribe.Keys(("k" * 40,))
BID = "6f1c1d36-9a57-4f0e-8a4e-0d8f5a0c1b2e"
HTML = """<html><body>
<p><a class="btn" href="https://shop.example.com/a?x=1&amp;y=2#top">Shop</a></p>
<p><a href='https://example.com/caf&#233;?q=&#xfc;ber&amp;z'>Café</a>
<a href=https://example.com/plain>plain</a>
<A HREF="https://example.com/ünï/path?ä=ö#frag-ment">upper</A>
<a href="https://example.com/legacy?a=1&copy=2&amp;b">legacy</a>
<a href="{{ unsubscribe_url }}">Unsubscribe</a>
<a href="https://mail.example.org/p/preferences-token">Preferences</a>
<a href="https://MAIL.example.org/w/web-view">View in browser</a>
<a href="https://example.com/u/{{ contact.attributes.code }}">yours</a>
<a href="mailto:hi@example.com">mail</a> <a href="/relative">rel</a>
<a href="https://shop.example.com/a?x=1&amp;y=2#top">Shop again</a>
</p></body></html>"""
TEXT = """Hello,
see https://example.com/text-only?a=1&b=2. Or (https://example.com/paren).
Unsubscribe: {{ unsubscribe_url }}
"""
EXPECTED = ["https://shop.example.com/a?x=1&y=2#top",
            "https://example.com/café?q=über&z",
            "https://example.com/plain",
            "https://example.com/ünï/path?ä=ö#frag-ment",
            "https://example.com/legacy?a=1&copy=2&b",
            "https://example.com/text-only?a=1&b=2",
            "https://example.com/paren"]


def content(mode: str, links: tuple[str, ...] | None = None, **kw: object) -> message.Content:
    found = tuple(tracking.links_of(HTML, TEXT, BASE)) if links is None else links
    return message.Content(BID, "acme", "Hi", "news@example.com", TEXT, HTML, keys=KEYS,
                           base_url=BASE, track=mode, links=found, **kw)  # type: ignore[arg-type]


def tokens(part: str, kind: str) -> list[str]:
    return re.findall(re.escape(BASE) + f"/{kind}/([A-Za-z0-9_-]+)", part)


def test_the_stored_urls_are_exactly_what_the_template_wrote() -> None:
    # query strings, fragments, non-ASCII, &amp; and numeric references decoded as a browser
    # decodes an attribute; `&copy=2` is not a reference inside an attribute; pgcast's own
    # links, links made by tags, mailto: and relative links are not tracked; once each
    assert tracking.links_of(HTML, TEXT, BASE) == EXPECTED


def test_a_rendered_message_points_every_tracked_link_at_its_stored_url() -> None:
    msg = content("contact").render(42, "ann@example.com", "Ann", {"code": "c1"})
    assert msg.html is not None and msg.text is not None
    clicks = tokens(msg.html, "c")
    refs = [tracking.read(KEYS, t) for t in clicks]
    assert [EXPECTED[r.link or 0] for r in refs] == [*EXPECTED[:5], EXPECTED[0]]
    assert {r.contact_id for r in refs} == {42} and {r.kind for r in refs} == {1}
    assert [EXPECTED[tracking.read(KEYS, t).link or 0] for t in tokens(msg.text, "c")] \
        == EXPECTED[5:]
    assert "(" + BASE + "/c/" in msg.text  # the parenthesis stays outside the link
    # never rewritten: unsubscribe, preferences, web view (anything under the public URL),
    # a link a tag makes (it differs per contact), mailto and relative links
    assert f'href="{BASE}/u/' in msg.html and msg.text.count(f"{BASE}/u/") == 1
    for kept in ('href="https://mail.example.org/p/preferences-token"',
                 'href="https://MAIL.example.org/w/web-view"',
                 'href="https://example.com/u/c1"', 'href="mailto:hi@example.com"',
                 'href="/relative"', 'class="btn"'):
        assert kept in msg.html
    # the open image, once, at the end of the body
    opens = tokens(msg.html, "o")
    assert len(opens) == 1 and tracking.read(KEYS, opens[0]).kind == tracking.KIND_OPEN
    assert msg.html.index("/o/") > msg.html.index("Shop again")
    assert msg.html.rstrip().endswith("</body></html>")


def test_none_adds_nothing_and_aggregate_names_nobody() -> None:
    plain = message.Content(BID, "acme", "Hi", "news@example.com", TEXT, HTML, keys=KEYS,
                            base_url=BASE).render(42, "ann@example.com", "Ann", {"code": "c1"})
    none = content("none").render(42, "ann@example.com", "Ann", {"code": "c1"})
    assert none.html is not None and "/c/" not in none.html and "/o/" not in none.html
    assert re.sub(r"/u/\S+\"", "", none.html) == re.sub(r"/u/\S+\"", "", plain.html or "")
    agg = content("aggregate").render(42, "ann@example.com", "Ann", {"code": "c1"})
    assert agg.html is not None
    refs = [tracking.read(KEYS, t) for t in tokens(agg.html, "c") + tokens(agg.html, "o")]
    assert refs and all(r.contact_id is None for r in refs)
    assert len({r.message for r in refs}) == 1  # one message: one number, not the contact
    test_send = content("contact", test=True).render(42, "ann@example.com", "Ann")
    assert test_send.html is not None and "/c/" not in test_send.html


def test_a_forged_truncated_or_altered_token_is_refused() -> None:
    msg = content("contact").render(42, "ann@example.com", "Ann", {"code": "c1"})
    assert msg.html is not None
    good = tokens(msg.html, "c")[0]
    assert tracking.read(KEYS, good).link == 0
    for cut in range(len(good)):
        with pytest.raises(tracking.InvalidToken):
            tracking.read(KEYS, good[:cut])
    for i in range(len(good)):  # any one character changed
        other = "A" if good[i] != "A" else "B"
        altered = good[:i] + other + good[i + 1:]
        try:
            ref = tracking.read(KEYS, altered)
        except tracking.InvalidToken:
            continue
        # base64's last character carries spare bits: only those may change nothing
        assert i == len(good) - 1 and ref == tracking.read(KEYS, good)
    with pytest.raises(tracking.InvalidToken):
        tracking.read(unsubscribe.Keys(("z" * 40,)), good)  # another key
    # rotation: a new first key makes tokens; the old one is still read
    assert tracking.read(unsubscribe.Keys(("n" * 40, "k" * 40)), good).link == 0
    for junk in ("", "x", "é" * 10, "A" * 500, "!!!!"):
        with pytest.raises(tracking.InvalidToken):
            tracking.read(KEYS, junk)


def test_location_is_what_a_browser_requests() -> None:
    assert tracking.location("https://example.com/a?x=1&y=2#top") \
        == "https://example.com/a?x=1&y=2#top"
    assert tracking.location("https://example.com/café?q=über&z") \
        == "https://example.com/caf%C3%A9?q=%C3%BCber&z"
    assert tracking.location("https://bücher.example/ä%20b") \
        == "https://xn--bcher-kva.example/%C3%A4%20b"


def test_the_text_part_made_from_html_is_rewritten_too() -> None:
    made = message.Content(BID, "acme", "Hi", "news@example.com", None, HTML, keys=KEYS,
                           base_url=BASE, track="aggregate",
                           links=tuple(tracking.links_of(HTML, None, BASE)))
    msg = made.render(7, "ann@example.com", "Ann", {"code": "c1"})
    assert msg.text is not None and "https://example.com/plain" not in msg.text
    assert f"{BASE}/c/" in msg.text


def ref(rendered_ago: float = 3600.0) -> tracking.Ref:
    return tracking.Ref(tracking.KIND_CLICK, uuid.UUID(BID), int(time.time() - rendered_ago),
                        0, None, 1)


CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")
APPLE_MPP = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
             "(KHTML, like Gecko)")
GMAIL = ("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
         "(via ggpht.com GoogleImageProxy)")


@pytest.mark.parametrize(("agent", "machine"), [
    (CHROME, False),
    (GMAIL, False),  # Gmail's proxy fetches when the message is opened
    (APPLE_MPP, True),  # Mail Privacy Protection fetches every image at delivery
    ("Mozilla/5.0 (compatible; Barracuda Sentinel)", True),
    ("Mimecast URL protect", True),
    ("python-requests/2.31", True),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/120.0", True),
    ("", True), (None, True),
])
def test_a_known_proxy_or_scanner_user_agent_is_a_machine(agent: str | None,
                                                          machine: bool) -> None:
    assert tracking_events.classify(ref(), agent, time.time()) is machine


def test_an_event_seconds_after_the_send_is_a_machine() -> None:
    now = time.time()
    assert tracking_events.classify(ref(rendered_ago=2), CHROME, now) is True
    assert tracking_events.classify(ref(rendered_ago=tracking_events.QUICK + 5), CHROME,
                                    now) is False


def event(link: int, message: int, arrived: float, links: int = 3) -> tracking_events.Event:
    return tracking_events.Event(uuid.UUID(BID), "click", link, None, message,
                                 dt.datetime.now(dt.UTC), False, links, arrived)


def test_every_link_of_a_message_clicked_at_once_is_a_machine() -> None:
    rec = tracking_events.Recorder(None)  # type: ignore[arg-type]
    t = time.monotonic() - 60
    scanned = [event(i, 1, t + 0.1 * i) for i in range(3)]  # all three links in 0.2 s
    human = [event(0, 2, t), event(1, 2, t + 1)]  # two of three
    slow = [event(i, 3, t + 5 * i) for i in range(3)]  # all three, seconds apart
    single = [event(0, 4, t, links=1)]  # a message with one link: no burst to speak of
    for e in sorted([*scanned, *human, *slow, *single], key=lambda e: e.arrived):
        rec.remember(e)
        rec.pending.append(e)
    out = rec.take()
    assert len(out) == 9
    assert [e.machine for e in out if e.message == 1] == [True, True, True]
    assert [e.machine for e in out if e.message == 2] == [False, False]
    assert [e.machine for e in out if e.message == 3] == [False, False, False]
    assert [e.machine for e in out if e.message == 4] == [False]


def test_events_are_held_until_a_burst_can_be_seen_whole() -> None:
    rec = tracking_events.Recorder(None)  # type: ignore[arg-type]
    fresh = event(0, 1, time.monotonic())
    rec.remember(fresh)
    rec.pending.append(fresh)
    assert rec.take() == [] and rec.take(everything=True) == [fresh]


@pytest.mark.parametrize(("method", "machine"), [("GET", False), ("HEAD", True)])
def test_a_head_request_is_a_machine(method: str, machine: bool) -> None:
    import asyncio

    from starlette.applications import Starlette
    from starlette.requests import Request

    from pgcast.api import tracking as tracking_routes

    app = Starlette()
    app.state.pool = None  # nothing is written here

    async def run() -> bool:
        request = Request({"type": "http", "method": method, "app": app, "path": "/c/x",
                           "headers": [(b"user-agent", CHROME.encode())], "query_string": b""})
        tracking_routes._record(request, ref(), "click", 3)
        rec = tracking_routes.recorder(app)
        assert rec._task is not None
        rec._task.cancel()
        return rec.pending[0].machine

    assert asyncio.run(run()) is machine


def test_at_most_500_links_of_at_most_2048_bytes_are_tracked() -> None:
    many = "".join(f'<a href="https://example.com/{i}">x</a>' for i in range(600))
    assert tracking.links_of(many, None, BASE) == [f"https://example.com/{i}" for i in range(500)]
    long = "https://example.com/" + "a" * 2029  # 2049 bytes
    assert tracking.links_of(f'<a href="{long[:-1]}">x</a><a href="{long}">y</a>', None,
                             BASE) == [long[:-1]]


def test_a_full_buffer_drops_the_oldest_events(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    monkeypatch.setattr(tracking_events, "MAX_PENDING", 3)

    async def run() -> tuple[list[int], int]:
        rec = tracking_events.Recorder(None)  # type: ignore[arg-type]
        for i in range(5):
            rec.add(event(i % 3, i, time.monotonic()))
        assert rec._task is not None
        rec._task.cancel()
        return [e.message for e in rec.pending], rec.dropped

    assert asyncio.run(run()) == ([2, 3, 4], 2)


class _Reference(__import__("html.parser").parser.HTMLParser):
    """Python's HTML parser itself: the hrefs of <a>/<area> start tags, and where they are."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.source = source
        self.found: list[tuple[str, int]] = []
        self.lines = [0] + [i + 1 for i, c in enumerate(source) if c == "\n"]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("a", "area"):
            line, col = self.getpos()
            hrefs = [v for k, v in attrs if k == "href"]
            if hrefs and hrefs[0] is not None:
                self.found.append((hrefs[0], self.lines[line - 1] + col))

    handle_startendtag = handle_starttag


FRAGMENTS = [
    '<a href="https://e.com/a?x=1&amp;y=2#f">x</a>', "<a href='https://e.com/b'>", "<A HREF=c>",
    '<a class="x" href="https://e.com/&#233;">', "<a\nhref\n=\n'https://e.com/nl'>",
    '<a href="https://e.com/self"/>', "<area href=https://e.com/area>", "<a name=x>",
    "<!-- <a href='https://e.com/comment'> -->", "<script>if (a<b) '<a href=\"x\">'</script>",
    "<style>a{}</style><a href=https://e.com/after-style>", '<img alt="<a href=\'no\'>">',
    "1 < 2 and 3<4 <3", "<a href=\"https://e.com/unclosed", "<!DOCTYPE html>", "<?xml x?>",
    "</a>", "</p >", "<p>text &amp; more</p>", '<a href="">empty</a>', "<a href>bare</a>",
    '<a title=">" href="https://e.com/gt">', "<a/href=https://e.com/slash>", "<br/>",
    '<a href="https://e.com/1" href="https://e.com/2">', "<a\thref='https://e.com/tab'>",
    "<![CDATA[<a href=x>]]>", "<a href='https://e.com/&copy=1&amp'>", "<<a href=x>",
    "<script/>", "<SCRIPT >x<a href=https://e.com/in-script></script >", "<!-- unclosed",
    "<![CDATA[ x > <a href=https://e.com/cdata> ]]>", "<a href=x", "<p", "<a href='q' '>",
]


@pytest.mark.parametrize("seed", range(300))
def test_the_link_scanner_reads_hrefs_as_python_s_html_parser_does(seed: int) -> None:
    import random

    rng = random.Random(seed)
    doc = "".join(rng.choice(FRAGMENTS) + rng.choice(["", " ", "\n", "x"])
                  for _ in range(rng.randrange(1, 40)))
    ref = _Reference(doc)
    ref.feed(doc)
    ref.close()
    mine = tracking.hrefs(doc)
    # the same attributes' raw text (the parser decodes it with html.unescape, which reads
    # `&copy=1` as a reference even in an attribute: see attribute_value)
    assert [html.unescape(doc[h.start:h.end]) for h in mine] == [u for u, _ in ref.found], doc
    for h, (_, tag_at) in zip(mine, ref.found, strict=True):  # inside the tag it saw
        assert tag_at < h.start <= h.end <= len(doc)
        assert tracking.attribute_value(doc[h.start:h.end]) == h.url
