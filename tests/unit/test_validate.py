"""Input checks at the edge (mail.validate): nothing stored can become header syntax."""

from __future__ import annotations

import pytest

from pgcast.mail import errors, validate


@pytest.mark.parametrize("bad", ["Bob\r\nBcc: evil@example.com", "a\nb", "nul\x00", "nel\x85",
                                 "ls\u2028", "ps\u2029", "vt\v", "ff\f", "esc\x1b"])
def test_names_and_subjects_refuse_control_characters(bad: str) -> None:
    with pytest.raises(errors.InvalidValue, match="control character"):
        validate.name(bad)
    with pytest.raises(errors.InvalidValue, match="control character"):
        validate.subject(bad)


def test_non_ascii_names_and_subjects_are_data() -> None:
    assert validate.name("Jürgen") == "Jürgen"
    assert validate.subject("=?utf-8?q?Hello=0D=0ABcc=3A_evil=40evil.com?=").startswith("=?")


@pytest.mark.parametrize(("given", "stored"), [
    ("A@Example.COM", "A@example.com"),
    ("a@bücher.example", "a@xn--bcher-kva.example"),
])
def test_addresses_are_normalized_with_idna_domains(given: str, stored: str) -> None:
    assert validate.address(given) == stored


@pytest.mark.parametrize(("bad", "why"), [
    ("üser@example.com", "ASCII"),
    ("x" * 8_000_000 + "@example.com", "at most 254"),
    ("a\r\n@b.com", "control character"),
    ("é <attacker@evil.com>,", "ASCII"),
    ("not-an-address", "@"),
])
def test_bad_addresses_are_refused_with_a_reason(bad: str, why: str) -> None:
    with pytest.raises(errors.InvalidValue, match=why):
        validate.address(bad)


@pytest.mark.parametrize(("given", "want"), [
    ("a@example.com", ("", "a@example.com")),
    ("Zoë <z@acme.example>", ("Zoë", "z@acme.example")),
    ('"Acme, Inc." <a@x.example>', ("Acme, Inc.", "a@x.example")),
])
def test_a_from_parses_to_exactly_what_was_given(given: str, want: tuple[str, str]) -> None:
    assert validate.sender(given) == want


@pytest.mark.parametrize("bad", ["evil@evil.com <a@example.com>", "a@x.example, b@y.example",
                                 "Bob <a@x.example", "undisclosed:;", "Bob\r\n <a@x.example>"])
def test_a_from_that_would_be_read_differently_is_refused(bad: str) -> None:
    with pytest.raises(errors.InvalidValue):
        validate.sender(bad)


def test_tags_are_bounded_before_they_are_looked_at() -> None:
    with pytest.raises(errors.InvalidValue, match="at most 100 tags"):
        validate.tags(["t"] * 100_000)
    assert validate.tags(["a", " a ", "b"]) == ["a", "b"]


def test_attributes_are_flat_bounded_json() -> None:
    assert validate.attributes({"plan": "pro", "seats": 3, "vip": True}) == {
        "plan": "pro", "seats": 3, "vip": True}
    for bad in ({"nested": {"a": 1}}, {"list": [1]}, {"n": float("nan")}, {"": "x"},
                {f"k{i}": "v" for i in range(51)}, {"big": "x" * 1001}):
        with pytest.raises(errors.InvalidValue):
            validate.attributes(bad)
