"""The Prometheus endpoint of `pgcast api` and `pgcast worker` (--metrics-addr), and the
gauges of the queue as Postgres sees it, read at each scrape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import prometheus_client
import psycopg
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pgcast.sql import db, errors
from pgcast.sql.queries import QUERIES

SCRAPE_TIMEOUT = 5  # seconds to connect to Postgres at a scrape


def parse_addr(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port); InvalidInput otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.InvalidInput(f"--metrics-addr must be HOST:PORT, not {text!r}")
    return host, int(port)


class QueueCollector(Collector):
    """pgcast_queue_* and pgcast_broadcasts, one query per scrape (the same in every process)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Read the queue from Postgres; pgcast_database_up says whether that worked."""
        row: dict[str, Any] | None = None
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=SCRAPE_TIMEOUT,
                                 row_factory=psycopg.rows.dict_row, **db.CONNECT_KWARGS) as conn:
                row = conn.execute(QUERIES["metrics_queue"]).fetchone()
        except psycopg.Error:
            row = None
        up = GaugeMetricFamily("pgcast_database_up",
                               "1 when this process could read the queue from Postgres")
        up.add_metric([], 0 if row is None else 1)
        yield up
        if row is None:
            return
        pending = GaugeMetricFamily(
            "pgcast_queue_pending", "recipients of sending and paused broadcasts not finished "
            "yet (waiting, claimed or at the provider), from the broadcasts' counters")
        pending.add_metric([], float(row["pending"]))
        yield pending
        flight = GaugeMetricFamily(
            "pgcast_queue_in_flight", "recipient rows in workers' hands, from the in-flight "
            "indexes (at most workers x batch size)", labels=["status"])
        flight.add_metric(["claimed"], float(row["claimed"]))
        flight.add_metric(["sending"], float(row["sending"]))
        yield flight
        count = GaugeMetricFamily("pgcast_broadcasts", "broadcasts by status",
                                  labels=["status"])
        count.add_metric(["sending"], float(row["broadcasts_sending"]))
        count.add_metric(["paused"], float(row["broadcasts_paused"]))
        yield count


def serve(addr: str, url: str) -> tuple[str, int]:
    """Start the metrics endpoint on HOST:PORT in a daemon thread; the address bound."""
    host, port = parse_addr(addr)
    try:
        prometheus_client.start_http_server(port, addr=host)
    except OSError as exc:
        raise errors.InvalidInput(f"cannot serve metrics on {addr}: {exc}") from None
    prometheus_client.REGISTRY.register(QueueCollector(url))
    return host, port
