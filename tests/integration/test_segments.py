"""Issue 27: saved segments, filters at the edges (API 422 / CLI exit 2 naming the JSON path),
hostile names and values as data, limits, and a snapshot fixed at send."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import psycopg
import pytest

from pgcast.bin import cli
from pgcast.sql import broadcasts, errors, segments
from pgcast.worker import starter
from tests.integration import test_api_helpers as h

Conn = psycopg.Connection[dict[str, Any]]
A = h.ACCOUNT
HOSTILE = ["plan'); DROP TABLE contacts; --", 'x" OR 1=1 --', "$1", "%s", "%(account)s",
           "a\\'b", "c.attributes", "') OR true OR ('", "{}", "ünï ☃"]


def _add(conn: Conn, email: str, tags: list[str] | None = None,
         attributes: dict[str, Any] | None = None, account: str = A) -> int:
    row = conn.execute("INSERT INTO contacts (account, email, tags, attributes) "
                       "VALUES (%s, %s, %s, %s::jsonb) RETURNING id",
                       (account, email, tags or [], json.dumps(attributes or {}))).fetchone()
    assert row is not None
    return int(row["id"])


def _emails(conn: Conn, f: Any) -> list[str]:
    return sorted(r["email"] for r in conn.execute(
        "SELECT email FROM pgcast_segment_contacts_v1(%s, %s::jsonb)", (A, json.dumps(f))))


def _refused(conn: Conn, f: Any) -> str:
    with pytest.raises(errors.InvalidInput) as exc:
        segments.count(conn, A, f)
    return str(exc.value)


def test_hostile_attribute_names_and_values_are_data(conn: Conn) -> None:
    """Names and values that look like SQL (or like placeholders) select exactly the contacts
    that hold them, in attribute names, values, tags, prefixes and domains; nothing runs."""
    for i, text in enumerate(HOSTILE):
        _add(conn, f"h{i}@example.com", tags=[text], attributes={text: text, "plain": text})
    _add(conn, "bystander@example.com", attributes={"plan": "pro"})
    for i, text in enumerate(HOSTILE):
        want = [f"h{i}@example.com"]
        assert _emails(conn, {"attribute": text, "eq": text}) == want
        assert _emails(conn, {"attribute": "plain", "in": [text]}) == want
        assert _emails(conn, {"attribute": text, "exists": True}) == want
        assert _emails(conn, {"attribute": "plain", "prefix": text}) == want
        assert _emails(conn, {"tag": text}) == want
        assert segments.count(conn, A, {"all": [{"tag": text},
                                                {"attribute": text, "eq": text}]}) == 1
        assert _emails(conn, {"email_domain": text}) == []
        # a saved segment with the hostile text inside, sent through psycopg's parameters
        segments.save(conn, A, f"h{i}", {"attribute": text, "eq": text})
        assert segments.count(conn, A, {"segment": f"h{i}"}) == 1
    # the compiled SQL holds none of it: values are bound, only positions are in the text
    for text in HOSTILE:
        row = conn.execute("SELECT predicate, params FROM pgcast_segment_sql_v1(%s, %s::jsonb)",
                           (A, json.dumps({"attribute": text, "prefix": text}))).fetchone()
        assert row is not None
        if text not in ("$1", "c.attributes"):  # those two are the SQL's own words
            assert text not in row["predicate"], row["predicate"]
        assert row["params"] == [text, text]
    assert conn.execute("SELECT count(*) AS n FROM contacts").fetchone() == {
        "n": len(HOSTILE) + 1}


def test_too_deep_or_too_large_is_refused_naming_the_path(conn: Conn) -> None:
    deep: dict[str, Any] = {"tag": "a"}
    for _ in range(10):
        deep = {"not": deep}
    assert _refused(conn, deep).startswith("$" + ".not" * 10 + ": too deep")
    nine = {"not": {"not": {"not": {"not": {"not": {"not": {"not": {"not": {"not": {
        "tag": "a"}}}}}}}}}}
    assert segments.count(conn, A, nine) == 0  # ten levels: allowed
    wide = {"any": [{"all": [{"tag": f"t{i}"} for i in range(50)]} for _ in range(5)]}
    assert ": too large: at most 200 conditions" in _refused(conn, wide)
    assert _refused(conn, {"any": [{"tag": "a"}] * 101}).startswith(
        "$.any: must be a list of at most 100")
    assert _refused(conn, {"attribute": "a", "in": list(range(101))}).startswith("$.in: ")
    assert "too large" in _refused(conn, {"any": [{"tag": "x" * 99}] * 99 + [
        {"attribute": "n", "in": ["y" * 900] * 60}]})
    # nested deeper than anything legal: refused before it reaches the database
    very: Any = {"tag": "a"}
    for _ in range(5000):
        very = {"not": very}
    assert _refused(conn, very).startswith("$: too deep")
    # a chain of saved segments counts towards the depth where it is expanded
    segments.save(conn, A, "d0", {"tag": "a"})
    for i in range(1, 10):
        segments.save(conn, A, f"d{i}", {"segment": f"d{i - 1}"})
    msg = _refused(conn, {"not": {"segment": "d9"}})
    assert msg.startswith("$.not.segment(d9).segment(d8)") and "too deep" in msg


def test_unknown_or_invalid_parts_are_named_by_json_path(conn: Conn) -> None:
    bad = {"all": [{"tag": "a"}, {"any": []}, {"attribute": "", "eq": 1}]}
    assert _refused(conn, bad).startswith("$.all[2].attribute: ")
    for f, path in (
            ({"all": [{"tag": "a"}, {"attribute": "plan", "like": "p%"}]}, "$.all[1].like"),
            ({"any": [{"colour": "red"}]}, "$.any[0].colour"),
            ({"attribute": "n", "gt": "5"}, "$.gt"),
            ({"attribute": "n", "lte": True}, "$.lte"),
            ({"attribute": "n", "eq": {"a": 1}}, "$.eq"),
            ({"attribute": "n", "in": [1, [2]]}, "$.in[1]"),
            ({"attribute": "n", "exists": "yes"}, "$.exists"),
            ({"not": {"created_after": "2024-01-01T10:00"}}, "$.not.created_after"),
            ({"not": {"created_before": "2024-02-30"}}, "$.not.created_before"),
            ({"received": "not-a-uuid"}, "$.received"),
            ({"delivered": "00000000-0000-0000-0000-000000000000"}, "$.delivered"),
            ({"opened": "00000000-0000-0000-0000-000000000000"}, "$.opened"),
            ({"clicked": "00000000-0000-0000-0000-000000000000"}, "$.clicked"),
            ({"segment": "nope"}, "$.segment"),
            ({"tag": "a", "email_domain": "b"}, "$"),
            ({"email_domain": "a@b"}, "$.email_domain"),
            ([{"tag": "a"}], "$")):
        msg = _refused(conn, f)
        assert msg.startswith(path + ": "), (f, msg)
    # opened and clicked exist since 0020 (tests/integration/test_tracking.py): an unknown
    # broadcast is refused as the other broadcast conditions refuse it
    assert "no broadcast" in _refused(conn, {"clicked": "00000000-0000-0000-0000-0000000000"
                                                        "00"})


def test_saved_segments_refuse_cycles_and_deletes_in_use(conn: Conn) -> None:
    segments.save(conn, A, "a", {"tag": "x"})
    segments.save(conn, A, "b", {"any": [{"segment": "a"}, {"tag": "y"}]})
    with pytest.raises(errors.InvalidInput, match=r"\$\.segment\(b\)\.any\[0\]\.segment: "
                                                  r"saved segment a refers to itself"):
        segments.save(conn, A, "a", {"segment": "b"})
    with pytest.raises(errors.InvalidInput, match="refers to itself"):
        segments.save(conn, A, "c", {"segment": "c"})
    assert segments.get(conn, A, "a")["filter"] == {"tag": "x"}  # unchanged
    draft = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                              segment="b")
    refused = segments.delete(conn, A, "a")
    assert refused["success"] is False and refused["used_by"] == ["segment b"]
    assert segments.delete(conn, A, "b")["used_by"] == [f"broadcast {draft['id']}"]
    conn.execute("DELETE FROM broadcasts WHERE id = %s", (draft["id"],))
    assert segments.delete(conn, A, "b")["success"] is True
    assert segments.delete(conn, A, "a")["success"] is True
    with pytest.raises(errors.NotFound):
        segments.delete(conn, A, "a")
    # names are per account
    segments.save(conn, "other", "a", {"tag": "z"})
    with pytest.raises(errors.InvalidInput, match=r"^\$\.segment: no saved segment a"):
        segments.count(conn, A, {"segment": "a"})


def test_the_snapshot_is_fixed_at_send(conn: Conn) -> None:
    """Editing (or deleting) the saved segment after the send changes neither the recipients
    nor the frozen filter of the sent broadcast; a later broadcast uses the new definition."""
    for i in range(5):
        _add(conn, f"vip{i}@example.com", tags=["vip"], attributes={"plan": "pro"})
    _add(conn, "free@example.com", tags=["vip"], attributes={"plan": "free"})
    for i in range(3):
        _add(conn, f"beta{i}@example.com", tags=["beta"])
    segments.save(conn, A, "paying", {"all": [{"tag": "vip"},
                                              {"attribute": "plan", "eq": "pro"}]})
    row = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                            segment="paying")
    assert row["segment_filter"] == {"segment": "paying"}
    result = broadcasts.send(conn, A, row["id"])
    assert result["queued"] == 5
    frozen = {"all": [{"tag": "vip"}, {"attribute": "plan", "eq": "pro"}]}
    recipients = sorted(r["email"] for r in conn.execute(
        "SELECT email FROM broadcast_recipients WHERE broadcast_id = %s", (row["id"],)))
    sent = broadcasts.get(conn, A, row["id"])
    assert sent["filter_used"] == frozen
    assert sent["audit_log"][-1]["details"]["filter"] == frozen
    segments.save(conn, A, "paying", {"tag": "beta"})  # edited after the send
    _add(conn, "late@example.com", tags=["vip"], attributes={"plan": "pro"})
    again = broadcasts.get(conn, A, row["id"])
    assert (again["filter_used"], again["total"]) == (frozen, 5)
    assert sorted(r["email"] for r in conn.execute(
        "SELECT email FROM broadcast_recipients WHERE broadcast_id = %s",
        (row["id"],))) == recipients
    later = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                              segment="paying")
    assert broadcasts.send(conn, A, later["id"])["queued"] == 3
    assert broadcasts.get(conn, A, later["id"])["filter_used"] == {"tag": "beta"}


def test_a_tag_is_the_tag_filter_and_everyone_is_all(conn: Conn) -> None:
    _add(conn, "a@example.com", tags=["t"])
    _add(conn, "b@example.com")
    tagged = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                               tag="t")
    everyone = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t")
    assert broadcasts.send(conn, A, tagged["id"])["queued"] == 1
    assert broadcasts.send(conn, A, everyone["id"])["queued"] == 2
    assert broadcasts.get(conn, A, tagged["id"])["filter_used"] == {"tag": "t"}
    assert broadcasts.get(conn, A, everyone["id"])["filter_used"] == {"all": []}
    with pytest.raises(errors.InvalidInput, match="one of segment, filter or tag"):
        broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                          tag="t", filter_value={"tag": "t"})


def test_an_empty_segment_is_refused_unless_allowed(conn: Conn) -> None:
    _add(conn, "a@example.com", attributes={"plan": "free"})
    f = {"attribute": "plan", "eq": "pro"}
    row = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                            filter_value=f)
    result = broadcasts.send(conn, A, row["id"])
    assert (result["success"], result["status"]) == (False, "empty")
    assert "no subscribed contact matches the filter {" in result["message"]
    assert '"attribute":"plan"' in result["message"]
    assert broadcasts.get(conn, A, row["id"])["status"] == "draft"
    assert broadcasts.send(conn, A, row["id"], allow_empty=True)["status"] == "sent"


def test_a_send_whose_saved_segment_is_gone_is_refused(conn: Conn) -> None:
    """A DBA deleted the segment a draft and a scheduled broadcast name: the send is refused
    (exit 2 / 422), the scheduled start ends failed with invalid_segment."""
    _add(conn, "a@example.com", tags=["t"])
    segments.save(conn, A, "s", {"tag": "t"})
    draft = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                              segment="s")
    due = broadcasts.create(conn, A, subject="S", from_address="n@example.com", text="t",
                            segment="s")
    conn.execute("UPDATE broadcasts SET status = 'scheduled', scheduled_at = now() "
                 "WHERE id = %s", (due["id"],))
    conn.execute("DELETE FROM segments")
    with pytest.raises(errors.InvalidInput, match=r"^\$\.segment: no saved segment s"):
        broadcasts.send(conn, A, draft["id"])
    assert broadcasts.get(conn, A, draft["id"])["status"] == "draft"
    started = starter.start_due(conn)
    assert [(r["status"], r["reason"]) for r in started] == [("failed", "invalid_segment")]
    failed = broadcasts.get(conn, A, due["id"])
    assert failed["failed_reason"] == "invalid_segment"
    assert "no saved segment s" in failed["audit_log"][-1]["details"]["error"]


# -- the API ---------------------------------------------------------------------------------


def test_api_segments_routes(api: h.Api, conn: Conn) -> None:
    _add(conn, "a@example.com", tags=["vip"], attributes={"plan": "pro", "country": "FR"})
    _add(conn, "b@example.com", tags=["vip"], attributes={"plan": "pro", "country": "DE"})
    _add(conn, "c@example.com", tags=["vip"], attributes={"plan": "pro"}, account="other")
    f = {"all": [{"tag": "vip"}, {"not": {"attribute": "country", "eq": "DE"}}]}
    r = api.post("/segments", json={"name": "vip-not-de", "filter": f})
    assert r.status_code == 201, r.text
    assert r.json()["filter"] == f
    assert api.post("/segments", json={"name": "vip-not-de", "filter": f}).status_code == 200
    assert api.get("/segments").json()["segments"][0]["name"] == "vip-not-de"
    assert api.get("/segments/vip-not-de").json()["filter"] == f
    assert api.get("/segments/nope").status_code == 404
    assert api.post("/segments/count", json={"filter": {"segment": "vip-not-de"}}).json() == {
        "count": 1}
    assert api.post("/segments/count", json={"filter": {"tag": "vip"}}).json() == {"count": 2}
    bad = api.post("/segments/count", json={"filter": {"all": [{"tag": "vip"}, {"tag": 1},
                                                               {"attribute": "", "eq": 1}]}})
    assert bad.status_code == 422 and bad.json()["message"].startswith("$.all[1].tag: ")
    bad = api.post("/segments", json={"name": "x", "filter": {"all": [{"opened": "x"}]}})
    assert bad.status_code == 422 and bad.json()["message"].startswith("$.all[0].opened: ")
    assert api.post("/segments", json={"name": "-x", "filter": {"tag": "a"}}).status_code == 422
    # a broadcast to the segment: the frozen filter in the API's shapes
    r = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com",
                                      "text": "Hello", "segment": "vip-not-de"})
    assert r.status_code == 201, r.text
    bid = r.json()["id"]
    assert (r.json()["filter"], r.json()["filter_used"]) == ({"segment": "vip-not-de"}, None)
    used = api.delete("/segments/vip-not-de")
    assert used.status_code == 409 and used.json()["used_by"] == [f"broadcast {bid}"]
    assert api.post(f"/broadcasts/{bid}/send").json()["queued"] == 1
    assert api.get(f"/broadcasts/{bid}").json()["filter_used"] == f
    assert api.get(f"/broadcasts/{bid}/progress").json()["filter_used"] == f
    assert api.delete("/segments/vip-not-de").status_code == 204  # the sent one needs it not
    # a filter given inline, and a PATCH of a draft's audience
    r = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com",
                                      "text": "Hello", "filter": {"tag": "vip"}})
    assert r.status_code == 201 and r.json()["filter"] == {"tag": "vip"}
    draft = r.json()["id"]
    r = api.patch(f"/broadcasts/{draft}", json={"tag": "vip"})
    assert (r.json()["tag"], r.json()["filter"]) == ("vip", None)
    r = api.patch(f"/broadcasts/{draft}", json={"filter": {"attribute": "country", "eq": "FR"}})
    assert (r.json()["tag"], r.json()["filter"]) == (None, {"attribute": "country", "eq": "FR"})
    r = api.patch(f"/broadcasts/{draft}", json={"segment": "gone"})
    assert r.status_code == 422 and r.json()["message"].startswith("$.segment: no saved")
    r = api.patch(f"/broadcasts/{draft}", json={"filter": None})
    assert (r.json()["tag"], r.json()["filter"]) == (None, None)
    r = api.patch(f"/broadcasts/{draft}", json={"segment": None, "tag": "vip"})
    assert (r.json()["tag"], r.json()["filter"]) == ("vip", None)
    r = api.patch(f"/broadcasts/{draft}", json={"filter": {"attribute": "country", "eq": "FR"}})
    r = api.post("/broadcasts", json={"subject": "Hi", "from": "news@example.com",
                                      "text": "Hello", "filter": {"tag": "a"}, "tag": "a"})
    assert r.status_code == 422
    assert api.get(f"/broadcasts/{draft}/audience").json()["audience"] == 1
    copied = api.post(f"/broadcasts/{draft}/copy")  # a copy keeps the audience
    assert copied.json()["filter"] == {"attribute": "country", "eq": "FR"}


# -- the CLI ---------------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, json.loads(out.out) if out.out.strip().startswith("{") else out.out, out.err


def test_cli_segment_commands(db_url: str, conn: Conn, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    _add(conn, "a@example.com", tags=["beta"], attributes={"plan": "team"}, account="default")
    _add(conn, "b@example.com", tags=["beta"], attributes={"plan": "free"}, account="default")
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"all": [{"tag": "beta"},
                                        {"attribute": "plan", "in": ["pro", "team"]}]}))
    code, out, _ = _cli(capsys, "segment", "save", "paying-beta", f"@{path}")
    assert code == 0 and out["created"] is True and out["count"] == 1
    code, out, _ = _cli(capsys, "segment", "count", "paying-beta")
    assert (code, out) == (0, {"count": 1})
    code, out, _ = _cli(capsys, "segment", "count", "--filter", '{"tag": "beta"}')
    assert (code, out) == (0, {"count": 2})
    code, out, err = _cli(capsys, "segment", "count", "--filter",
                          '{"all": [{"tag": "beta"}, {"attribute": "plan", "gt": "x"}]}')
    assert code == 2 and "$.all[1].gt: must be a number" in err
    code, out, err = _cli(capsys, "segment", "save", "x", '{"any": [{"tag": "b"}, {"nope": 1}]}')
    assert code == 2 and "$.any[1].nope: unknown condition" in err
    code, out, err = _cli(capsys, "segment", "count", "--filter", "{not json")
    assert code == 2 and "not JSON" in err
    code, out, _ = _cli(capsys, "segment", "list")
    assert [s["name"] for s in out["segments"]] == ["paying-beta"]
    code, out, _ = _cli(capsys, "segment", "show", "paying-beta")
    assert out["filter"]["all"][0] == {"tag": "beta"}
    text = tmp_path / "t.txt"
    text.write_text("Hello")
    code, bid, _ = _cli(capsys, "broadcast", "create", "--subject", "S", "--from",
                        "n@example.com", "--text", str(text), "--segment", "paying-beta")
    assert code == 0
    bid = bid.strip()
    code, out, _ = _cli(capsys, "segment", "delete", "paying-beta")
    assert code == 1 and out["used_by"] == [f"broadcast {bid}"]
    code, out, _ = _cli(capsys, "broadcast", "edit", bid, "--no-filter")
    assert code == 0 and (out["filter"], out["tag"]) == (None, None)
    code, out, _ = _cli(capsys, "broadcast", "edit", bid, "--filter", '{"tag": "beta"}')
    assert code == 0 and out["filter"] == {"tag": "beta"}
    code, out, _ = _cli(capsys, "broadcast", "send", bid)
    assert code == 0 and out["queued"] == 2
    code, out, _ = _cli(capsys, "broadcast", "status", bid)
    assert out["filter_used"] == {"tag": "beta"}
    code, out, _ = _cli(capsys, "broadcast", "show", bid)
    assert out["filter_used"] == {"tag": "beta"}
    code, out, _ = _cli(capsys, "segment", "delete", "paying-beta")
    assert code == 0 and out["success"] is True
    code, _, err = _cli(capsys, "broadcast", "create", "--subject", "S", "--from",
                        "n@example.com", "--text", str(text), "--filter", '{"tag": 5}')
    assert code == 2 and "$.tag: must be a tag" in err
    code, _, err = _cli(capsys, "broadcast", "create", "--subject", "S", "--from",
                        "n@example.com", "--text", str(text), "--segment", "gone")
    assert code == 2 and "$.segment: no saved segment gone" in err


def test_the_compiled_sql_shown_to_dbas(conn: Conn) -> None:
    """The example of docs/segments.md, as it is."""
    row = conn.execute("SELECT * FROM pgcast_segment_sql_v1('acme', "
                       """'{"attribute": "plan", "in": ["pro", "team"]}')""").fetchone()
    assert row is not None
    assert row["predicate"] == "(c.attributes @> ($1->1) OR c.attributes @> ($1->2))"
    assert row["params"] == ["plan", {"plan": "pro"}, {"plan": "team"}]


def test_created_after_and_before_read_offsets_and_dates(conn: Conn) -> None:
    old = _add(conn, "old@example.com")
    new = _add(conn, "new@example.com")
    conn.execute("UPDATE contacts SET created_at = %s WHERE id = %s",
                 (dt.datetime(2024, 1, 1, 23, 30, tzinfo=dt.UTC), old))
    conn.execute("UPDATE contacts SET created_at = %s WHERE id = %s",
                 (dt.datetime(2024, 1, 2, 0, 30, tzinfo=dt.UTC), new))
    conn.execute("SET TimeZone = 'America/New_York'")  # the session's zone changes nothing
    assert _emails(conn, {"created_after": "2024-01-02"}) == ["new@example.com"]
    assert _emails(conn, {"created_before": "2024-01-02"}) == ["old@example.com"]
    assert _emails(conn, {"created_after": "2024-01-02T01:00:00+01:00"}) == ["new@example.com"]
    assert _emails(conn, {"created_after": "2024-01-01T19:00:00-05:00"}) == ["new@example.com"]


def test_a_count_is_bounded_in_time(api: h.Api, conn: Conn,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant's filter cannot hold a connection for long: past the limit the count is
    cancelled and answered 422 (exit 2 in the CLI); within it the same count answers."""
    from tests import support

    support.seed_contacts(conn, 100_000, account=A)
    f = {"attribute": "score", "gt": 5}
    assert segments.count(conn, A, f) == 0
    assert api.post("/segments/count", json={"filter": f}).json() == {"count": 0}
    monkeypatch.setattr(segments, "COUNT_TIMEOUT_MS", 1)
    with pytest.raises(errors.InvalidInput, match=r"^\$: counting this filter took longer"):
        segments.count(conn, A, f)
    r = api.post("/segments/count", json={"filter": f})
    assert r.status_code == 422 and "took longer than 0.001 s" in r.json()["message"]
    # the limit was the count's own: the connection and the pool answer as before
    assert conn.execute("SHOW statement_timeout").fetchone() == {"statement_timeout": "0"}
    monkeypatch.setattr(segments, "COUNT_TIMEOUT_MS", 10_000)
    assert api.post("/segments/count", json={"filter": {"tag": "x"}}).json() == {"count": 0}
