"""A worker's Prometheus metrics: the provider's calls and the engine's statements, measured
from outside the engine (a wrapping provider and an Engine whose statement runner observes)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import prometheus_client as prom
import prometheus_client.core as prom_core

from pgcast.worker import engine, errors, pg, providers, render

MESSAGES = prom.Counter("pgcast_messages", "messages by outcome: sent, rejected, "
                        "unknown, transient, throttled, account_blocked, stopped (its group "
                        "was stopped while it waited in the pacer: never sent)", ["outcome"])
PROVIDER_SECONDS = prom.Histogram("pgcast_provider_seconds", "time of one provider call")
IN_FLIGHT = prom.Gauge("pgcast_provider_calls_in_flight", "provider calls in progress")
THROTTLES = prom.Counter("pgcast_throttles", "provider throttles (each empties the global "
                         "bucket for a moment)")
PAUSES = prom.Counter("pgcast_pauses", "broadcasts this worker paused, by reason", ["reason"])
TOKEN_WAITS = prom.Counter("pgcast_token_waits", "takes that found the token bucket empty")
TOKEN_WAIT_SECONDS = prom.Counter("pgcast_token_wait_seconds",
                                  "seconds the bucket said to wait, summed over token_waits")
GROUP_SIZE = prom.Histogram("pgcast_handoff_group_size", "recipients per handoff",
                            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000))
STATEMENT_SECONDS = prom.Histogram("pgcast_statement_seconds", "time of one engine statement "
                                   "(claim, claim_handoff, handoff, record, release, finalize)",
                                   ["statement"])
TIMED = frozenset({"claim", "claim_handoff", "handoff", "record", "release", "finalize"})
OUTCOMES = ((errors.Stopped, "stopped"), (errors.Throttled, "throttled"),
            (errors.AccountBlocked, "account_blocked"),
            (errors.RecipientRejected, "rejected"), (errors.OutcomeUnknown, "unknown"),
            (errors.Transient, "transient"))


class MeteredProvider:
    """A provider that counts and times every call of the one it wraps."""

    def __init__(self, inner: providers.Provider) -> None:
        self.inner = inner
        self.name = inner.name
        self.blocking = inner.blocking
        # what the engine concludes from an unclassified error is the wrapped provider's call
        self.may_have_sent_on_error = getattr(inner, "may_have_sent_on_error", True)
        # a provider that paces at the wire keeps doing so when measured
        pace_with = getattr(inner, "pace_with", None)
        if pace_with is not None:
            self.pace_with = pace_with
        # a provider that carries many messages per call keeps doing so when measured
        if hasattr(inner, "send_many") and hasattr(inner, "bulk_max"):
            self.send_many = self._send_many
            self.bulk_max = inner.bulk_max
        counts = getattr(inner, "connection_counts", None)
        if counts is not None:
            self.connection_counts = counts
            CONNECTIONS.counts = counts  # the process's provider (one per worker process)
            if not CONNECTIONS.registered:
                prom.REGISTRY.register(CONNECTIONS)
                CONNECTIONS.registered = True

    def send(self, message: render.Message) -> str:
        """The wrapped send, measured."""
        IN_FLIGHT.inc()
        started = time.perf_counter()
        outcome = "error"
        try:
            message_id = self.inner.send(message)
            outcome = "sent"
            return message_id
        except errors.ProviderError as exc:
            outcome = next((name for kind, name in OUTCOMES if isinstance(exc, kind)), "error")
            raise
        finally:
            PROVIDER_SECONDS.observe(time.perf_counter() - started)
            IN_FLIGHT.dec()
            MESSAGES.labels(outcome).inc()
            if outcome == "throttled":
                THROTTLES.inc()

    def _send_many(self, messages: Sequence[render.Message]
                   ) -> list[str | errors.ProviderError]:
        """The wrapped send_many, measured: one call's time, each message's outcome."""
        IN_FLIGHT.inc()
        started = time.perf_counter()
        results: list[str | errors.ProviderError] = []
        try:
            results = self.inner.send_many(messages)  # type: ignore[attr-defined]
            return results
        finally:
            PROVIDER_SECONDS.observe(time.perf_counter() - started)
            IN_FLIGHT.dec()
            outcomes = ["sent" if isinstance(result, str) else next(
                (name for kind, name in OUTCOMES if isinstance(result, kind)), "error")
                for result in results]
            for outcome in outcomes:
                MESSAGES.labels(outcome).inc()
            if "throttled" in outcomes:  # one call, one throttle
                THROTTLES.inc()

    def max_send_rate(self) -> float | None:
        """The wrapped provider's limit."""
        return self.inner.max_send_rate()


class ConnectionCollector:
    """The provider's connection counts (worker.sesconn), read at each scrape."""

    def __init__(self) -> None:
        self.counts: Callable[[], dict[str, int]] = dict
        self.registered = False

    def collect(self) -> Iterator[prom_core.Metric]:
        """pgcast_provider_connections{event} and pgcast_provider_transport_failures{cause}."""
        c = self.counts()
        events = prom_core.CounterMetricFamily(
            "pgcast_provider_connections", "provider connections by event: opened, waited "
            "(at the gate that opens a few at a time), retired_idle", labels=["event"])
        for event in ("opened", "waited", "retired_idle"):
            events.add_metric([event], c.get(event, 0))
        yield events
        causes = prom_core.CounterMetricFamily(
            "pgcast_provider_transport_failures", "provider calls the transport failed, by "
            "cause: before_write (nothing written: retried), after_write (outcome unknown)",
            labels=["cause"])
        causes.add_metric(["before_write"], c.get("failed_before_write", 0))
        causes.add_metric(["after_write"], c.get("unknown_after_write", 0))
        yield causes


CONNECTIONS = ConnectionCollector()


class MeteredDb(pg.Db):
    """The engine's named statements, each observed."""

    async def q(self, name: str, params: dict[str, Any] | None = None
                ) -> list[tuple[Any, ...]]:
        """Run and observe one named statement."""
        started = time.perf_counter()
        rows = await super().q(name, params)
        _observe(name, params, rows, started)
        return rows

    async def dicts(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run and observe one named query read by column name."""
        started = time.perf_counter()
        rows = await super().dicts(name, params)
        _observe(name, params, rows, started)
        return rows

    async def table(self, name: str, params: dict[str, Any]) -> pg.Rows:
        """Run and observe one named query read as columns."""
        started = time.perf_counter()
        rows = await super().table(name, params)
        _observe(name, params, rows.rows, started)
        return rows


def _observe(name: str, params: dict[str, Any] | None, rows: Sequence[Any],
             started: float) -> None:
    if name in TIMED:
        STATEMENT_SECONDS.labels(name).observe(time.perf_counter() - started)
    p = params or {}
    if name == "handoff":
        GROUP_SIZE.observe(len(p.get("ids") or ()))
    elif name == "claim_handoff":
        if rows:  # the batch it claimed and handed off in one statement
            GROUP_SIZE.observe(len(rows))
    elif name in ("take_tokens", "take_own_tokens") and rows and not rows[0][0]:
        TOKEN_WAITS.inc()
        TOKEN_WAIT_SECONDS.inc(max(0.0, float(rows[0][1])))
    elif name == "broadcast_pause":
        PAUSES.labels(str(p.get("reason"))).inc()


class MeteredEngine(engine.Engine):
    """The engine, with each named statement it runs observed (through its Db)."""

    db_class = MeteredDb
