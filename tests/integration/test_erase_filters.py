"""An erase takes the erased address out of every filter that names it (migration 0032):
saved segments, a draft's filter, a sent broadcast's filter_used and its send's audit entry.
Each condition that names it selects what a value no contact has would select, and the
rewrite is in the audit log of the segment or the broadcast."""

from __future__ import annotations

import json
from typing import Any

import psycopg

from pgcast.sql import broadcasts, schedule, segments
from pgcast.sql.queries import QUERIES
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT
ANN = "ann@example.com"
NOBODY = {"any": []}
EVERYONE = {"not": {"any": []}}


def _add(conn: Conn, email: str, tags: list[str] | None = None,
         attributes: dict[str, Any] | None = None) -> None:
    conn.execute("INSERT INTO contacts (account, email, tags, attributes) "
                 "VALUES (%s, %s, %s, %s::jsonb)",
                 (A, email, tags or [], json.dumps(attributes or {})))


def _erase(conn: Conn, email: str) -> dict[str, Any]:
    row = conn.execute(QUERIES["contact_erase"], {"account": A, "email": email,
                                                  "source": "api",
                                                  "actor": '{"via": "test"}'}).fetchone()
    assert row is not None
    return dict(row)


def _names_ann(value: Any) -> bool:
    return ANN in json.dumps(value).lower()


def test_an_erase_rewrites_every_filter_that_names_the_address(conn: Conn) -> None:
    _add(conn, ANN, tags=["vip"])
    _add(conn, "bob@example.com", tags=["vip", "ann@example.com"],
         attributes={"referrer": "ann@example.com", "x": "ann@example.com/2024"})
    _add(conn, "cy@example.com", tags=["vip"], attributes={"referrer": "zed@example.com"})
    _add(conn, "dee@example.com", tags=["vip"])
    segments.save(conn, A, "referred", {"attribute": "referrer", "eq": "ann@example.com"})
    mixed = {"all": [
        {"tag": "vip"},
        {"attribute": "referrer", "in": ["ANN@example.com", "zed@example.com"]},
        {"not": {"attribute": "referrer", "ne": "ann@example.com"}},
    ]}
    segments.save(conn, A, "mixed", mixed)
    segments.save(conn, A, "either", {"any": [{"tag": "ann@example.com"},
                                              {"attribute": "x", "prefix": "ann@example.com"},
                                              {"attribute": "referrer",
                                               "in": ["ann@example.com"]},
                                              {"tag": "list:Ann@Example.com"},
                                              {"attribute": "ann@example.com",
                                               "exists": True}]})
    segments.save(conn, A, "other", {"attribute": "referrer", "eq": "zed@example.com"})
    before = {n: segments.count(conn, A, {"segment": n})
              for n in ("referred", "mixed", "either", "other")}
    assert before == {"referred": 1, "mixed": 0, "either": 1, "other": 1}
    draft = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                              filter_value={"not": {"tag": "ann@example.com"}})
    sent = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                             segment="either")
    assert broadcasts.send(conn, A, sent["id"])["queued"] == 1
    plain = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                              segment="other")
    later = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                              filter_value={"attribute": "referrer", "in": [ANN, "x@y.org"]})
    assert schedule.schedule(conn, A, later["id"], "2099-01-01T00:00:00Z")["success"]
    assert _names_ann(broadcasts.get(conn, A, sent["id"])["filter_used"])

    out = _erase(conn, ANN)

    assert out["segments"] == 3
    rows = {r["name"]: r for r in conn.execute(
        "SELECT name, filter, audit_log FROM segments WHERE account = %s", (A,))}
    assert rows["referred"]["filter"] == NOBODY
    assert rows["mixed"]["filter"] == {"all": [
        {"tag": "vip"},
        {"attribute": "referrer", "in": ["zed@example.com"]},
        {"not": EVERYONE},
    ]}
    assert rows["either"]["filter"] == {"any": [NOBODY] * 5}
    assert rows["other"]["filter"] == {"attribute": "referrer", "eq": "zed@example.com"}
    for name in ("referred", "mixed", "either"):
        [entry] = rows[name]["audit_log"]
        assert entry["action"] == "erase"
        assert entry["details"] == {"via": "test", "source": "api", "scrubbed": ["filter"]}
    assert rows["other"]["audit_log"] == []
    # what each rewritten segment selects now: the value no contact has
    after = {n: segments.count(conn, A, {"segment": n})
             for n in ("referred", "mixed", "either", "other")}
    assert after == {"referred": 0, "mixed": 0, "either": 0, "other": 1}

    d = broadcasts.get(conn, A, draft["id"])
    assert d["segment_filter"] == {"not": NOBODY}
    assert d["audit_log"][-1]["action"] == "erase"
    assert d["audit_log"][-1]["details"]["scrubbed"] == ["segment_filter"]
    assert (d["audit_log"][-1]["from"], d["audit_log"][-1]["to"]) == ("draft", "draft")
    s = broadcasts.get(conn, A, sent["id"])
    assert s["filter_used"] == {"any": [NOBODY] * 5}
    assert s["audit_log"][-1]["details"]["scrubbed"] == ["filter_used", "audit_log"]
    assert not _names_ann(s["audit_log"])
    sc = broadcasts.get(conn, A, later["id"])
    assert (sc["status"], sc["segment_filter"]) == (
        "scheduled", {"attribute": "referrer", "in": ["x@y.org"]})
    assert (sc["audit_log"][-1]["from"], sc["audit_log"][-1]["to"]) == ("scheduled", "scheduled")
    p = broadcasts.get(conn, A, plain["id"])
    assert p["audit_log"][-1]["action"] != "erase"
    # nowhere in a filter or an audit log
    left = conn.execute(
        "SELECT (SELECT count(*) FROM segments WHERE strpos(lower(filter::text || "
        "audit_log::text), %(a)s) > 0) + (SELECT count(*) FROM broadcasts WHERE "
        "strpos(lower(coalesce(segment_filter::text, '') || coalesce(filter_used::text, '')"
        " || audit_log::text), %(a)s) > 0) AS n", {"a": ANN}).fetchone()
    assert left == {"n": 0}
    # another contact's data is theirs: kept
    bob = conn.execute("SELECT tags, attributes FROM contacts WHERE email = 'bob@example.com'"
                       ).fetchone()
    assert bob == {"tags": ["vip", "ann@example.com"],
                   "attributes": {"referrer": "ann@example.com", "x": "ann@example.com/2024"}}


def test_an_erase_of_an_address_that_is_no_contact_still_rewrites_the_filters(
        conn: Conn) -> None:
    _add(conn, "bob@example.com", attributes={"referrer": "gone@example.com"})
    segments.save(conn, A, "referred", {"attribute": "referrer", "eq": "gone@example.com"})
    out = _erase(conn, "Gone@Example.com ")
    assert (out["contact_id"], out["segments"]) == (None, 1)
    assert segments.get(conn, A, "referred")["filter"] == NOBODY


def test_the_scrub_leaves_a_filter_without_the_address_as_it_is(conn: Conn) -> None:
    f = {"all": [{"tag": "vip"}, {"attribute": "n", "gt": 3}, {"created_after": "2024-01-01"},
                 {"email_domain": "example.com"}, {"not": {"any": []}}]}
    row = conn.execute("SELECT pgcast_segment_scrub_v1(%s::jsonb, %s) AS f",
                       (json.dumps(f), ANN)).fetchone()
    assert row == {"f": f}


def test_an_erase_of_a_text_that_is_no_address_rewrites_no_filter(conn: Conn) -> None:
    """Only an address is looked for inside strings: an erase of `vip` (not an address, erased
    as given) leaves `{"tag": "vip"}` and `{"tag": "vip-2024"}` alone."""
    _add(conn, "bob@example.com", tags=["vip"])
    f = {"any": [{"tag": "vip"}, {"tag": "vip-2024"}]}
    segments.save(conn, A, "vips", f)
    out = _erase(conn, "vip")
    assert out["segments"] == 0
    row = segments.get(conn, A, "vips")
    assert row["filter"] == f
    assert conn.execute("SELECT audit_log FROM segments").fetchone() == {"audit_log": []}
