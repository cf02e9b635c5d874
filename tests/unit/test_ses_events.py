"""api.ses_events: both SES shapes, bounce types, tags, and text the database can hold."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from pgcast.api import ses_events
from tests import snsmessages as m

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def parse(body: dict[str, object]) -> ses_events.Event:
    event = ses_events.parse(json.dumps(body), NOW)
    assert event is not None
    return event


def test_both_shapes_and_every_bounce_type() -> None:
    bid = uuid.uuid4()
    for shape in ("eventType", "notificationType"):
        for bounce_type, kind in (("Permanent", "bounce"), ("Transient", "soft_bounce"),
                                  ("Undetermined", "soft_bounce")):
            e = parse(m.ses_event("Bounce", "a@example.com", broadcast=bid, contact=7,
                                  shape=shape, bounce_type=bounce_type))
            assert (e.event, e.broadcast, e.contact, e.addresses) == (
                kind, bid, 7, ["a@example.com"])
            assert e.detail is not None and bounce_type in e.detail
    c = parse(m.ses_event("Complaint", "a@example.com", at=NOW - dt.timedelta(days=3)))
    assert (c.event, c.broadcast, c.contact, c.detail, c.at) == (
        "complaint", None, None, "abuse", NOW - dt.timedelta(days=3))
    assert parse(m.ses_event("Delivery", "a@example.com")).event == "delivery"
    assert parse(m.ses_event("Open", "a@example.com")).event == "open"


def test_bad_tags_are_no_tags_and_nul_never_reaches_the_database() -> None:
    body = m.ses_event("Bounce", "a@example.com", broadcast="not-a-uuid", contact="7")
    assert parse(body).broadcast is None and parse(body).contact is None
    body = m.ses_event("Bounce", "a@example.com", broadcast=uuid.uuid4(), contact="-1")
    assert parse(body).contact is None
    body = m.ses_event("Bounce", "a\x00@example.com")
    body["bounce"]["bouncedRecipients"][0]["diagnosticCode"] = "550\x00 gone"  # type: ignore[index]
    e = parse(body)
    assert e.addresses == [] and e.detail is not None and "\x00" not in e.detail
    assert ses_events.parse("not json", NOW) is None
    assert ses_events.parse("[1]", NOW) is None
