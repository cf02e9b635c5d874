"""api.sns bounds what an unsigned message can make the API do: fetches, threads, depth."""

from __future__ import annotations

import threading

import pytest

from pgcast.api import sns

URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-{}.pem"


def test_fetches_in_flight_are_bounded_and_a_busy_refusal_is_not_remembered() -> None:
    release, started = threading.Event(), threading.Semaphore(0)
    calls: list[str] = []

    def slow(url: str) -> bytes:
        calls.append(url)
        started.release()
        release.wait(10)
        raise OSError("timed out")

    verifier = sns.Verifier(frozenset(), 60, fetch=slow)
    threads = [threading.Thread(target=lambda i=i: pytest.raises(
        sns.CertificateUnavailable, verifier.key, URL.format(i))) for i in range(sns.MAX_FETCHES)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=10)
    with pytest.raises(sns.FetchesBusy):  # at once: no thread waits behind the slow ones
        verifier.key(URL.format("late"))
    release.set()
    for t in threads:
        t.join(10)
    assert len(calls) == sns.MAX_FETCHES
    with pytest.raises(sns.CertificateUnavailable) as caught:  # "late" was not remembered
        verifier.key(URL.format("late"))
    assert not isinstance(caught.value, sns.FetchesBusy)
    assert calls[-1] == URL.format("late")


def test_a_burst_for_one_url_makes_one_fetch() -> None:
    gate, calls = threading.Event(), []

    def slow(url: str) -> bytes:
        calls.append(url)
        gate.wait(10)
        raise OSError("down")

    verifier = sns.Verifier(frozenset(), 60, fetch=slow)
    outcomes: list[type] = []

    def one() -> None:
        try:
            verifier.key(URL.format("same"))
        except Exception as exc:  # noqa: BLE001 - the type is what is checked
            outcomes.append(type(exc))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    while not calls:
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(10)
    assert calls == [URL.format("same")]
    assert outcomes == [sns.CertificateUnavailable] * 8


@pytest.mark.parametrize(("text", "ok"), [
    ("[" * 32 + "]" * 32, True), ("[" * 33 + "]" * 33, False),
    ('{"a": "' + "[" * 100 + '"}', True),  # brackets in a string do not nest
    ('["\\"[[[[", ' + ", ".join(["{}"] * 1000) + "]", True),
])
def test_json_depth_is_checked_before_parsing(text: str, ok: bool) -> None:
    assert sns.json_depth_ok(text) is ok
    if not ok:
        with pytest.raises(ValueError, match="deeper than 32"):
            sns.loads(text)
    else:
        sns.loads(text)


@pytest.mark.timeout(60, method="thread")
def test_a_body_of_unmatched_quotes_is_one_linear_pass() -> None:
    """512 KiB of `"\\"` kept a backtracking string pattern busy for many minutes, holding the
    GIL (every request of every account waited); the possessive one reads it in one pass. The
    limit is thousands of times what the pass takes: only a backtracking pattern reaches it."""
    text = '"\\"' * (512 * 1024 // 3)
    assert sns.json_depth_ok(text) is True
    assert sns.json_depth_ok('["' + "\\\\" * 1000 + '", [[1]]]', 2) is False


def test_a_null_subject_is_left_out_of_the_signed_text_as_an_absent_one() -> None:
    """check() lets an optional field be null; canonical() then raised TypeError (a 500)."""
    base = {"Type": "Notification", "MessageId": "m", "Message": "x", "Timestamp": "t",
            "TopicArn": "arn"}
    assert sns.canonical({**base, "Subject": None}) == sns.canonical(base)
