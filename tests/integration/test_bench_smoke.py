"""The bench probes run end to end at a tiny size (figures and timing belong in bench/)."""

from __future__ import annotations

from bench import drain, floor
from tests import support


def test_floor_probe_drains_every_row(db_url: str) -> None:
    figures = floor.run(db_url, 2_000)  # asserts every row ended `sent`
    assert figures[0].key == "floor" and figures[0].value > 0


def test_drain_sends_every_recipient(db_url: str) -> None:
    results = drain.run_series(db_url, 2_000)
    assert [r.recipients for r in results] == [2_000]
    with support.connect(db_url) as conn:
        row = conn.execute("SELECT id FROM broadcasts").fetchone()
        assert row is not None
        assert support.status_counts(conn, row["id"]) == {"sent": 2_000}
        support.assert_counters_true(conn, row["id"])
    assert all(rss > 0 for rss in results[0].peak_rss)


def test_schedule_probe_starts_the_due_broadcasts(db_url: str) -> None:
    from bench import schedule

    with support.connect(db_url) as conn:
        support.seed_contacts(conn, 20, account="bench")
    figures = schedule.measure(db_url, 50, 5, 2)  # asserts both due broadcasts started
    assert len(figures["empty"]) == len(figures["sweep"]) == 5
    assert figures["per_start"] > 0 and figures["plan"]  # a 50-row table may be scanned
