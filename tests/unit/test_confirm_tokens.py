"""Sign-up confirmation tokens: exact, opaque, expiring, rotating, never an unsubscribe token."""

from __future__ import annotations

import uuid

import pytest

from pgcast.mail import confirm, unsubscribe

A = "a" * 40
B = "b" * 40


def test_a_token_names_its_address_form_and_time() -> None:
    form = uuid.uuid4()
    keys = unsubscribe.Keys((A,))
    token = confirm.make(keys, "ann@example.com", form, now=1_000_000)
    got = confirm.read(keys, token, now=1_000_000 + 3600)
    assert (got.email, got.form_id, got.issued) == ("ann@example.com", form, 1_000_000.0)
    assert str(form) not in token and "ann" not in token


def test_a_token_expires_after_seven_days() -> None:
    keys = unsubscribe.Keys((A,))
    token = confirm.make(keys, "a@example.com", uuid.uuid4(), now=1_000_000)
    confirm.read(keys, token, now=1_000_000 + confirm.LIFETIME)
    with pytest.raises(confirm.Expired):
        confirm.read(keys, token, now=1_000_000 + confirm.LIFETIME + 1)


def test_keys_rotate_and_an_unknown_key_or_a_change_is_refused() -> None:
    token = confirm.make(unsubscribe.Keys((A,)), "a@example.com", uuid.uuid4())
    assert confirm.read(unsubscribe.Keys((B, A)), token).email == "a@example.com"
    with pytest.raises(unsubscribe.InvalidToken):
        confirm.read(unsubscribe.Keys((B,)), token)
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(unsubscribe.InvalidToken):
        confirm.read(unsubscribe.Keys((A,)), flipped)
    for bad in ("", "x" * 5000, "ü", "!!!"):
        with pytest.raises(unsubscribe.InvalidToken):
            confirm.read(unsubscribe.Keys((A,)), bad)


def test_confirmation_and_unsubscribe_tokens_are_not_interchangeable() -> None:
    keys = unsubscribe.Keys((A,))
    unsub = keys.make("acct", 7, uuid.uuid4())
    with pytest.raises(unsubscribe.InvalidToken):
        confirm.read(keys, unsub)
    with pytest.raises(unsubscribe.InvalidToken):
        keys.read(confirm.make(keys, "a@example.com", uuid.uuid4()))


def test_the_confirmation_mail_shows_the_link_escaped() -> None:
    subject, text, html = confirm.message('https://x.example/f/confirm/a"<b>&')
    assert subject == confirm.SUBJECT
    assert 'https://x.example/f/confirm/a"<b>&' in text
    assert '"<b>' not in html and "a&quot;&lt;b>&amp;" in html
