"""bench.provider end to end at a tiny size: the endpoint counts what the workers send."""

from __future__ import annotations

from pathlib import Path

from bench import provider


def test_provider_case_delivers_each_recipient_once(db_url: str, tmp_path: Path) -> None:
    result = provider.run_case(db_url, 20, 0, 1, 200, tmp_path, [])
    assert (result.received, result.duplicates) == (200, 0)
    assert result.split == [200] and result.steady > 0
    assert 0 < result.most_in_flight <= 128  # the default --max-in-flight


def test_split_counts_every_row_of_the_two_processes(db_url: str, tmp_path: Path) -> None:
    split = provider.run_split(db_url, tmp_path)
    assert sum(split) == provider.SPLIT_RECIPIENTS and len(split) <= 2
