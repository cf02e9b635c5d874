"""The worker's Python per recipient for one null-provider group, part by part (issue 32).

No database: a group of `--group` recipients (the claim's columns as psycopg returns them)
goes through what the engine's direct path does with it in the worker: the recipients built
from the columns, the messages filled from the content's skeleton (tokens included), the
null provider called for each in order, the record's parameters built. Each part is timed
alone (`timeit`, best of `--repeat`), and the whole group once more through
`worker.render.fill_many`, as the engine calls it. The benchmark's plain content
(bench.common.TEMPLATES["plain"]) or `--links`: a text and an HTML part that print the
unsubscribe link.

    .venv/bin/python -m bench.group_path
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import timeit
import uuid
from collections.abc import Callable

from bench import common
from pgcast.mail import message
from pgcast.worker import dispatch, providers, render


def content(links: bool) -> message.Content:
    """The benchmark's plain content, or one printing the unsubscribe link twice."""
    if links:
        return message.Content(str(uuid.uuid4()), "bench", "Bench", "bench@example.com",
                               "Hello.\n" * 20 + "Unsubscribe: {{ unsubscribe_url }}\n",
                               "<p>Hello.</p>" * 20 + '<a href="{{ unsubscribe_url }}">x</a>')
    t = common.TEMPLATES["plain"]
    return message.Content(str(uuid.uuid4()), "bench", str(t["subject"]), "bench@example.com",
                           t["text"], t["html"])


def main(argv: list[str] | None = None) -> None:
    """Time each part of a group's path; print µs per recipient."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", type=int, default=500)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--links", action="store_true")
    args = p.parse_args(argv)
    n = args.group
    c = content(args.links)
    made = c.skeleton(c.stand_in())
    assert c.usable(made)
    ids = list(range(1, n + 1))
    emails = [f"user{i}@example.com" for i in ids]
    names = [f"User {i}" for i in ids]
    nones: list[None] = [None] * n
    sender = dispatch.Sender(providers.NullProvider(), dispatch.Retries(), None)
    handed = list(map(dispatch.Recipient, ids, emails, names, nones, nones))
    filler = c.filler(made)
    messages = filler.fill(handed)
    built: list[render.Message | dispatch.Outcome] = [
        m for m in messages if isinstance(m, render.Message)]
    outcomes = sender.send_in_order(built, {}, [])
    loop = asyncio.new_event_loop()

    def whole() -> None:
        group = list(map(dispatch.Recipient, ids, emails, names, nones, nones))
        results = loop.run_until_complete(render.fill_many(c, made, group))
        done = sender.send_in_order(
            [r for r in results if isinstance(r, render.Message)], {}, [])
        dispatch.record_params(uuid.uuid4(), uuid.uuid4(), done, 0)

    parts: list[tuple[str, Callable[[], object]]] = [
        ("recipients from the claim's columns",
         lambda: list(map(dispatch.Recipient, ids, emails, names, nones, nones))),
        ("fill (tokens included)", lambda: filler.fill(handed)),
        ("  of which the tokens", lambda: filler.tokens(ids)),
        ("send in order (null provider)", lambda: sender.send_in_order(built, {}, [])),
        ("record's parameters", lambda: dispatch.record_params(1, 2, outcomes, 0)),
        ("the whole group (fill_many, send, record's parameters)", whole),
    ]
    print(f"cpus {os.cpu_count()}, load average at start "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    kind = "a content printing its link twice" if args.links else "the plain content"
    print(f"group of {n}, {kind}; µs per recipient, best of {args.repeat}:")
    gc.freeze()
    for label, call in parts:
        best = min(timeit.repeat(call, number=20, repeat=args.repeat)) / 20
        print(f"  {best * 1e6 / n:7.2f}  {label}")
    loop.close()
    print(f"reproduce: {common.command('group_path', *(['--links'] if args.links else []))}")


if __name__ == "__main__":
    main()
