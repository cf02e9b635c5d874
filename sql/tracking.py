"""Opens and clicks: the account default, and one broadcast's report (shared by CLI and API)."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgcast.sql import errors
from pgcast.sql.queries import QUERIES

MODES = ("none", "aggregate", "contact")


def validate_mode(raw: Any) -> str:
    """A tracking mode: none, aggregate or contact; raises InvalidInput."""
    if not isinstance(raw, str) or raw not in MODES:
        raise errors.InvalidInput("track must be one of none, aggregate, contact")
    return raw


def _block(counts: dict[tuple[str, int], dict[str, Any]], kind: str, link: int,
           tracked: bool, by_person: bool) -> dict[str, int | None]:
    row = counts.get((kind, link), {})
    total = int(row.get("total") or 0)
    machine = int(row.get("machine") or 0)
    return {"total": total if tracked else None,
            "human": total - machine if tracked else None,
            "machine": machine if tracked else None,
            # only `contact` mode can tell one person twice from two people
            "unique": int(row.get("uniq") or 0) if by_person else None}


def report(head: dict[str, Any], counts: list[dict[str, Any]], series: list[dict[str, Any]],
           links: list[dict[str, Any]]) -> dict[str, Any]:
    """The stats shape: delivery counters, opens, clicks, per link, and the hourly series."""
    track = head["track"]
    tracked, by_person = track != "none", track == "contact"
    by_key = {(r["kind"], int(r["link"])): r for r in counts}
    clicks_total = {k: 0 for k in ("total", "machine")}
    for (kind, index), r in by_key.items():
        if kind == "click" and index >= 0:
            clicks_total["total"] += int(r["total"])
            clicks_total["machine"] += int(r["machine"])
    clicks = _block(by_key, "click", -1, tracked, by_person)
    if tracked:
        clicks.update(total=clicks_total["total"], machine=clicks_total["machine"],
                      human=clicks_total["total"] - clicks_total["machine"])
    per_link = []
    for link in links:
        block = _block(by_key, "click", int(link["idx"]), tracked, by_person)
        per_link.append({"index": int(link["idx"]), "url": link["url"],
                         "clicks": block["total"], "human": block["human"],
                         "machine": block["machine"], "unique": block["unique"]})
    return {"id": head["id"], "status": head["status"], "track": track,
            **{k: int(head[k]) for k in ("total", "sent", "delivered", "bounced",
                                         "complained", "unsubscribed")},
            "opens": _block(by_key, "open", -1, tracked, by_person),
            "clicks": clicks, "links": per_link,
            "series": [{"hour": r["hour"], "kind": r["kind"], "human": int(r["human"]),
                        "machine": int(r["machine"])} for r in series]}


def stats(conn: psycopg.Connection[Any], account: str, bid: uuid.UUID) -> dict[str, Any]:
    """One broadcast's report; raises NotFound."""
    cur = conn.cursor(row_factory=dict_row)
    head = cur.execute(QUERIES["tracking_stats_head"], {"id": bid, "account": account}).fetchone()
    if head is None:
        raise errors.NotFound(f"no broadcast {bid}")
    params = {"id": bid}
    return report(head, cur.execute(QUERIES["tracking_stats_counts"], params).fetchall(),
                  cur.execute(QUERIES["tracking_stats_series"], params).fetchall(),
                  cur.execute(QUERIES["tracking_stats_links"], params).fetchall())


def set_default(conn: psycopg.Connection[Any], account: str, mode: Any) -> dict[str, Any]:
    """Set an account's default tracking mode (operator only)."""
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(QUERIES["tracking_default_set"],
                      {"account": account, "mode": validate_mode(mode)}).fetchone()
    assert row is not None
    return dict(row)


def retention(conn: psycopg.Connection[Any], older_than: float) -> int:
    """Drop the event months older than the cutoff and archived broadcasts' firsts."""
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(QUERIES["tracking_retention"], {"older_than": older_than}).fetchone()
    return int(row["partitions"]) if row else 0
