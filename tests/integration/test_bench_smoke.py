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


def test_record_contention_records_every_group_with_either_version(db_url: str) -> None:
    from bench import common, record_contention

    common.seed_contacts(db_url, 1_200)
    for version in ("v6", "v7"):  # each round asserts every row recorded and counted
        rate, locked = record_contention.one_round(db_url, version, 2)
        assert rate > 0 and 0 <= locked <= 1
    with support.connect(db_url) as conn:
        for row in conn.execute("SELECT id FROM broadcasts").fetchall():
            assert support.status_counts(conn, row["id"]) == {"sent": 1_200}
            support.assert_counters_true(conn, row["id"])


def test_fresh_floor_times_both_versions_on_a_drained_partition(db_url: str) -> None:
    from bench import fresh_floor

    times = fresh_floor.measure(db_url, 2_000, 2)  # asserts the drain and both answers
    assert len(times[1]) == len(times[2]) == 2
    assert all(ms > 0 for ms in times[1] + times[2])
