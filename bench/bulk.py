"""SendBulkEmail vs SendEmail: client-side CPU per message of boto3 calls (issue 32's evaluation).

A local endpoint in a process of its own (so that its CPU is not counted) answers sesv2
SendEmail (POST /v2/email/outbound-emails, what bench.sesd serves) and SendBulkEmail
(POST /v2/email/outbound-bulk-emails, which bench.sesd answers 404) at once, with one
BulkEmailEntryResults entry (SUCCESS and a message id) per BulkEmailEntry. This process sends
the same pre-rendered messages (bench.common's `merge` template: merge tags, text and HTML,
each message's own List-Unsubscribe headers and EmailTags) through one shared sesv2 client
built like the worker's (worker.ses.SesProvider.from_env) on 16 threads:

- `send_email`: SesProvider.send, one call per message (what the worker does today);
- `bulk N`: SendBulkEmail with N entries per call: inline template content
  (DefaultContent.Template.TemplateContent = {{subject}} / {{text}} / {{html}}) and each
  entry's fully rendered subject, text and HTML as its ReplacementTemplateData, its own
  headers as ReplacementHeaders and its tags as ReplacementTags;
- `bulk 50, shared values once`: the same with what every entry has alike (the
  List-Unsubscribe-Post and X-Pgcast-Broadcast headers, the pgcast_broadcast tag) sent once
  in DefaultContent.Template.Headers and DefaultEmailTags.

CPU is this process's user + system time (getrusage) over the calls; rendering is not in it
(done once before). Rounds alternate the order of the modes; the median of each is printed.

    .venv/bin/python -m bench.bulk --messages 3000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing as mp
import os
import resource
import statistics
import time
import urllib.request
import uuid
from typing import Any

from bench import common, sesd

SEND_EMAIL = "/v2/email/outbound-emails"
SEND_BULK = "/v2/email/outbound-bulk-emails"
THREADS = 16
SIZES = (1, 10, 50)
SHARED = -50  # the mode: 50 entries, what every entry shares sent once (DefaultEmailTags,
# Template.Headers), only List-Unsubscribe and pgcast_contact per entry


# -- the endpoint (its own process) ---------------------------------------------------------


def serve(port_out: Any) -> None:
    """Answer SendEmail and SendBulkEmail at once; GET /_stats says what arrived."""
    stats = {"send_email": 0, "bulk_calls": 0, "bulk_entries": 0, "bytes_send": 0,
             "bytes_bulk": 0,
             "entries_with_headers": 0, "entries_with_tags": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await sesd.read_request(reader)
                if request is None:
                    return
                method, path, body = request
                status, answer = 200, {}  # type: tuple[int, dict[str, Any]]
                route = path.split("?")[0]
                if method == "POST" and route == SEND_EMAIL:
                    stats["send_email"] += 1
                    stats["bytes_send"] += len(body)
                    answer = {"MessageId": f"bench-{uuid.uuid4()}"}
                elif method == "POST" and route == SEND_BULK:
                    entries = json.loads(body)["BulkEmailEntries"]
                    stats["bulk_calls"] += 1
                    stats["bulk_entries"] += len(entries)
                    stats["bytes_bulk"] += len(body)
                    stats["entries_with_headers"] += sum(1 for e in entries
                                                         if e.get("ReplacementHeaders"))
                    stats["entries_with_tags"] += sum(1 for e in entries
                                                      if e.get("ReplacementTags"))
                    answer = {"BulkEmailEntryResults": [
                        {"Status": "SUCCESS", "MessageId": f"bench-{uuid.uuid4()}"}
                        for _ in entries]}
                elif method == "GET" and route == "/_stats":
                    answer = dict(stats)
                else:
                    status, answer = 404, {"message": f"not served here: {method} {path}"}
                data = json.dumps(answer).encode()
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                             f"x-amzn-RequestId: {uuid.uuid4()}\r\n"
                             f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        port_out.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def stats(port: int) -> dict[str, int]:
    """What the endpoint received so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=10) as r:
        return dict(json.loads(r.read()))


# -- the client -------------------------------------------------------------------------------


def messages(n: int) -> list[Any]:
    """n messages of the `merge` template, rendered here, each to its own contact."""
    from pgcast.worker import render

    t = common.TEMPLATES["merge"]
    content = render.Content.from_row({
        "id": str(uuid.uuid4()), "account": "bench", "subject": t["subject"],
        "from_address": "Bench <bench@example.com>", "text_body": t["text"],
        "html_body": t["html"]})
    return [render.render(content, i, f"user{i}@example.com", f"User {i}",
                          {"plan": "pro"}, []) for i in range(1, n + 1)]


def bulk_request(batch: list[Any], configuration_set: str | None,
                 shared: bool = False) -> dict[str, Any]:
    """One SendBulkEmail request for messages of one broadcast (same sender, same parts);
    `shared`: the headers and tags every entry has the same are sent once, in DefaultContent's
    Template.Headers and DefaultEmailTags."""
    from pgcast.mail import message as mail_message
    from pgcast.worker import ses

    first = batch[0]
    content: dict[str, str] = {"Subject": "{{subject}}"}
    if first.text is not None:
        content["Text"] = "{{text}}"
    if first.html is not None:
        content["Html"] = "{{html}}"
    same_headers = {k: v for k, v in first.headers.items()
                    if shared and all(m.headers.get(k) == v for m in batch)}
    first_tags = ses.email_tags(first)
    same_tags = [t for t in first_tags
                 if shared and all(t in ses.email_tags(m) for m in batch)]
    entries = []
    for m in batch:
        data = {"subject": m.subject}
        if m.text is not None:
            data["text"] = m.text
        if m.html is not None:
            data["html"] = m.html
        entries.append({
            "Destination": {"ToAddresses": [mail_message.unfolded(m.to)]},
            "ReplacementEmailContent": {"ReplacementTemplate": {
                "ReplacementTemplateData": json.dumps(data)}},
            "ReplacementHeaders": [{"Name": k, "Value": v} for k, v in m.headers.items()
                                   if k not in same_headers],
            "ReplacementTags": [t for t in ses.email_tags(m) if t not in same_tags],
        })
    request: dict[str, Any] = {
        "FromEmailAddress": mail_message.unfolded(first.from_address),
        "DefaultContent": {"Template": {"TemplateContent": content, "TemplateData": "{}"}},
        "BulkEmailEntries": entries,
    }
    if same_headers:
        request["DefaultContent"]["Template"]["Headers"] = [
            {"Name": k, "Value": v} for k, v in same_headers.items()]
    if same_tags:
        request["DefaultEmailTags"] = same_tags
    if configuration_set:
        request["ConfigurationSetName"] = configuration_set
    return request


def cpu() -> float:
    """This process's user + system CPU seconds so far."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def run_mode(provider: Any, pool: concurrent.futures.ThreadPoolExecutor, msgs: list[Any],
             size: int) -> tuple[float, float]:
    """Send every message in mode `size` (0: SendEmail; SHARED: 50 entries, shared values
    once); (CPU ms per message, messages/s)."""
    def one(m: Any) -> int:
        provider.send(m)
        return 1

    def bulk(batch: Any) -> int:
        answer = provider.client.send_bulk_email(**bulk_request(batch, None, size == SHARED))
        results = answer["BulkEmailEntryResults"]
        assert len(results) == len(batch) and all(r["Status"] == "SUCCESS"
                                                  for r in results), results
        return len(results)

    call = one if size == 0 else bulk
    step = abs(size)
    work: list[Any] = msgs if size == 0 else [msgs[i:i + step]
                                              for i in range(0, len(msgs), step)]
    c0, t0 = cpu(), time.perf_counter()
    done = sum(pool.map(call, work))
    c1, t1 = cpu(), time.perf_counter()
    assert done == len(msgs)
    return (c1 - c0) / done * 1000, done / (t1 - t0)


def main(argv: list[str] | None = None) -> None:
    """Rounds of every mode over the same messages; medians and ratios to SendEmail."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    print(f"cpus {os.cpu_count()}, load average at start "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    endpoint = ctx.Process(target=serve, args=(port_q,), daemon=True)
    endpoint.start()
    try:
        port = int(port_q.get(timeout=30))
        url = f"http://127.0.0.1:{port}"
        os.environ.update({"AWS_ENDPOINT_URL_SESV2": url, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_REGION": "us-east-1",
                           "PGCAST_PUBLIC_URL": "https://pgcast.example",
                           "PGCAST_UNSUBSCRIBE_SECRET":
                               "bench-unsubscribe-secret-of-at-least-32-bytes"})
        from pgcast.worker import ses

        msgs = messages(args.messages)
        provider = ses.SesProvider.from_env(THREADS)
        modes = [0, *SIZES, SHARED]
        results: dict[int, list[tuple[float, float]]] = {m: [] for m in modes}
        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            for m in modes:  # warm: each operation's model and the connections
                run_mode(provider, pool, msgs[:100], m)
            before = stats(port)
            for r in range(args.rounds):
                for m in (modes if r % 2 == 0 else modes[::-1]):
                    results[m].append(run_mode(provider, pool, msgs, m))
            after = stats(port)
    finally:
        endpoint.kill()
        endpoint.join(10)
    got = {k: after[k] - before[k] for k in after}
    per_round = args.messages * args.rounds
    assert got["send_email"] == per_round, got
    assert got["bulk_entries"] == per_round * (len(SIZES) + 1), got
    assert got["entries_with_headers"] == got["entries_with_tags"] == got["bulk_entries"], got
    base = statistics.median(c for c, _ in results[0])
    print(f"{args.messages:,} messages ({len(msgs[0].headers)} headers each: "
          f"{', '.join(msgs[0].headers)}), {THREADS} threads, one client, endpoint at 0 ms in "
          f"its own process; median of {args.rounds} rounds:")
    for m in modes:
        c = statistics.median(x for x, _ in results[m])
        rate = statistics.median(x for _, x in results[m])
        label = ("SendEmail, one call per message" if m == 0 else
                 "SendBulkEmail, 50, shared values once" if m == SHARED else
                 f"SendBulkEmail, {m} entries per call")
        print(f"  {label:38} {c:6.3f} ms CPU/message  {c / base:5.2f}x  "
              f"{rate:7,.0f} messages/s  (rounds: "
              + ", ".join(f"{x:.3f}" for x, _ in results[m]) + ")")
    print(f"request body bytes per message: SendEmail {got['bytes_send'] / per_round:,.0f}, "
          f"SendBulkEmail {got['bytes_bulk'] / got['bulk_entries']:,.0f} (all bulk modes); every "
          "bulk entry carried its ReplacementHeaders and ReplacementTags")
    print("load average at end " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("reproduce: " + common.command("bulk", "--messages", str(args.messages),
                                         "--rounds", str(args.rounds)))


if __name__ == "__main__":
    main()
