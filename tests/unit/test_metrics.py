"""Metrics pieces without a database: the metered provider, addresses, route labels."""

from __future__ import annotations

import pytest

from pgcast.api import metrics as api_metrics
from pgcast.sql import errors as sql_errors
from pgcast.sql import metrics as sql_metrics
from pgcast.worker import errors, metrics, render


class Scripted:
    """A fake provider (unit ring) that raises what it is told, in order."""

    name = "scripted"
    blocking = False

    def __init__(self, script: list[Exception | None]) -> None:
        self.script = script

    def send(self, message: render.Message) -> str:
        step = self.script.pop(0)
        if step is not None:
            raise step
        return "id-1"

    def max_send_rate(self) -> float | None:
        return 7.0


def value(name: str, **labels: str) -> float:
    got = metrics.prom.REGISTRY.get_sample_value(name, labels or None)
    return got or 0.0


def test_the_metered_provider_counts_each_call_by_outcome() -> None:
    outcomes = ["sent", "throttled", "account_blocked", "rejected", "unknown", "transient"]
    before = {o: value("pgcast_messages_total", outcome=o) for o in outcomes}
    throttles = value("pgcast_throttles_total")
    calls = value("pgcast_provider_seconds_count")
    p = metrics.MeteredProvider(Scripted([
        None, errors.Throttled("slow"), errors.AccountBlocked("account", "paused"),
        errors.RecipientRejected("no"), errors.OutcomeUnknown("?"), errors.Transient("503")]))
    message = render.Message(1, "a@example.com", "n@example.com", "s", "t", None)
    assert p.send(message) == "id-1"
    for _ in outcomes[1:]:
        with pytest.raises(errors.ProviderError):
            p.send(message)
    assert {o: value("pgcast_messages_total", outcome=o) - before[o] for o in outcomes} == {
        o: 1.0 for o in outcomes}
    assert value("pgcast_throttles_total") - throttles == 1
    assert value("pgcast_provider_seconds_count") - calls == 6
    assert value("pgcast_provider_calls_in_flight") == 0
    assert (p.name, p.blocking, p.max_send_rate()) == ("scripted", False, 7.0)


def test_metrics_addresses_are_checked() -> None:
    assert sql_metrics.parse_addr("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert sql_metrics.parse_addr("[::1]:9100") == ("::1", 9100)
    for bad in ("9100", ":9100", "host:", "host:0", "host:70000", "host:http"):
        with pytest.raises(sql_errors.InvalidInput):
            sql_metrics.parse_addr(bad)


def test_a_request_is_labelled_by_its_route_never_its_path() -> None:
    class Route:
        path = "/broadcasts/{id}"

    def progress() -> None: ...

    assert api_metrics.route_of({"route": Route()}) == "/broadcasts/{id}"
    assert api_metrics.route_of({"endpoint": progress}) == "progress"
    assert api_metrics.route_of({}) == "unmatched"
