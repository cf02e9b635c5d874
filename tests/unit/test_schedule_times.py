"""sql.schedule.parse_time / parse_window: the edge's checks of a schedule's times."""

from __future__ import annotations

import datetime as dt

import pytest

from pgcast.sql import errors, schedule

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize("raw", ["2026-12-01T12:00:00Z", "2026-12-01T13:00:00+01:00",
                                 "2026-12-01T11:59:01+00:00", " 2026-12-24T09:00:00-05:00 "])
def test_times_with_an_offset_from_a_minute_ago_on_are_accepted(raw: str) -> None:
    when = schedule.parse_time("at", raw, NOW)
    assert when.utcoffset() is not None and when >= NOW - schedule.PAST_TOLERANCE


@pytest.mark.parametrize(("raw", "message"), [
    ("2026-12-01T11:58:59+00:00", "in the past"),
    ("2026-12-24T09:00:00", "has no offset"),
    ("2026-12-24", "has no offset"),
    ("24/12/2026 09:00", "not an ISO 8601 time"),
    ("", "must be an ISO 8601 time"),
    (1733050800, "must be an ISO 8601 time"),
])
def test_bad_times_are_refused_with_a_clear_message(raw: object, message: str) -> None:
    with pytest.raises(errors.InvalidInput, match=message):
        schedule.parse_time("at", raw, NOW)


def test_not_after_must_not_precede_at() -> None:
    at, latest = schedule.parse_window("2026-12-02T09:00:00Z", "2026-12-02T10:00:00+01:00", NOW)
    assert latest == at
    with pytest.raises(errors.InvalidInput, match="not_after must not be earlier than at"):
        schedule.parse_window("2026-12-02T09:00:00Z", "2026-12-02T08:59:59Z", NOW)
    assert schedule.parse_window("2026-12-02T09:00:00Z", None, NOW)[1] is None
