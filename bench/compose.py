"""Message composition cost: messages composed per second of one core's CPU time.

One message = the merge-tag template of bench.common.TEMPLATES['merge'] (three merge tags
and the unsubscribe link, in a subject, a text and an HTML part) rendered for one contact,
with every header (To and From as RFC 2047 data, List-Unsubscribe with a fresh AES-GCM
token): what the worker hands the provider. CPU time (time.process_time) of this process,
so other load on a shared machine does not count; the RFC 5322 serialisation that only the
`file` provider does is measured separately.
"""

from __future__ import annotations

import argparse
import time
import uuid

from bench import common
from pgcast.mail import message

AIM = 10_000  # messages/s/core


def contacts(n: int) -> list[tuple[int, str, str, dict[str, str]]]:
    """n distinct contacts, a third of them nameless (the fallback path)."""
    return [(i, f"user{i}@example.com", "" if i % 3 == 0 else f"Name {i}",
             {"plan": "pro"} if i % 2 else {}) for i in range(n)]


def rate(n: int, serialise: bool) -> float:
    """Messages per CPU second."""
    t = common.TEMPLATES["merge"]
    content = message.Content(str(uuid.uuid4()), "bench", str(t["subject"]),
                              '"Bench News" <bench@example.com>', t["text"], t["html"])
    people = contacts(n)
    started = time.process_time()
    for cid, addr, name, attributes in people:
        msg = content.render(cid, addr, name, attributes)
        if serialise:
            message.to_rfc5322(msg, "<id@pgcast.local>", "Tue, 01 Dec 2026 00:00:00 GMT")
    return n / (time.process_time() - started)


def main(argv: list[str] | None = None) -> None:
    """Measure and report."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--messages", type=int, default=50_000)
    args = p.parse_args(argv)
    cmd = common.command("compose", "--messages", str(args.messages))
    rate(1000, False)  # warm up: template compilation, key derivation, imports
    composed = rate(args.messages, False)
    serialised = rate(max(1000, args.messages // 5), True)
    common.report([
        common.Figure("compose", "messages composed per CPU second (merge template, both "
                                 "parts, all headers, unsubscribe token)", composed,
                      "messages/s/core", aim=f">= {AIM:,}", passed=composed >= AIM,
                      command=cmd),
        common.Figure("compose_rfc5322", "... and serialised as RFC 5322 (the file provider)",
                      serialised, "messages/s/core", command=cmd),
    ], cmd)


if __name__ == "__main__":
    main()
