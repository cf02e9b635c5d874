"""POST /webhooks/ses: SES feedback through Amazon SNS, authenticated by the SNS signature."""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from pgcast.api import context, db, errors, http, ses_events, sns
from pgcast.api import tracking as tracking_routes

log = logging.getLogger("pgcast.api.webhooks")

MAX_BODY_BYTES = 512 * 1024  # an SNS message is at most 256 KB, plus its envelope
DEFAULT_MAX_AGE = 24 * 3600.0  # seconds: SNS retries keep the first Timestamp
DEFAULT_SOFT_BOUNCE_LIMIT = 3  # soft bounces in a row before a contact is suppressed
DEFAULT_GUARD_MIN = 200  # rows sent (since the last start) before the guard judges
DEFAULT_MAX_BOUNCE_RATE = 0.05  # hard bounces / rows sent (SES reviews accounts at 5 %)
DEFAULT_MAX_COMPLAINT_RATE = 0.001  # complaints / rows sent (SES reviews at 0.1 %)
REFUSED = "not a verified SNS message for this endpoint"  # the one refusal (403)
TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")  # boolean settings


@dataclass(frozen=True)
class Feedback:
    """What the webhook needs: the SNS verifier and the suppression and guard limits."""

    verifier: sns.Verifier
    soft_bounce_limit: int = DEFAULT_SOFT_BOUNCE_LIMIT
    guard_min: int = DEFAULT_GUARD_MIN
    max_bounce_rate: float = DEFAULT_MAX_BOUNCE_RATE
    max_complaint_rate: float = DEFAULT_MAX_COMPLAINT_RATE


def _number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise errors.ConfigError(f"{name} is not a number: {raw!r}") from None
    if not lo <= value <= hi:
        raise errors.ConfigError(f"{name} must be between {lo:g} and {hi:g}: {raw!r}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw not in TRUE + FALSE:
        raise errors.ConfigError(f"{name} must be 1 or 0 (true or false): {raw!r}")
    return raw in TRUE


def from_env(env: Mapping[str, str] | None = None) -> Feedback | None:
    """The webhook's configuration; None (the route answers 404) without PGCAST_SNS_TOPIC_ARNS."""
    env = os.environ if env is None else env
    topics = frozenset(t.strip() for t in env.get("PGCAST_SNS_TOPIC_ARNS", "").split(",")
                       if t.strip())
    if not topics:
        return None
    max_age = _number(env, "PGCAST_SNS_MAX_AGE", DEFAULT_MAX_AGE, 60, 14 * 24 * 3600)
    return Feedback(
        sns.Verifier(topics, max_age, require_v2=_flag(env, "PGCAST_SNS_REQUIRE_V2")),
        soft_bounce_limit=int(_number(env, "PGCAST_SOFT_BOUNCE_LIMIT",
                                      DEFAULT_SOFT_BOUNCE_LIMIT, 1, 1000)),
        guard_min=int(_number(env, "PGCAST_GUARD_MIN", DEFAULT_GUARD_MIN, 1, 10**9)),
        max_bounce_rate=_number(env, "PGCAST_MAX_BOUNCE_RATE", DEFAULT_MAX_BOUNCE_RATE, 0, 1),
        max_complaint_rate=_number(env, "PGCAST_MAX_COMPLAINT_RATE",
                                   DEFAULT_MAX_COMPLAINT_RATE, 0, 1))


async def _body(request: Request) -> Any:
    raw = await http.read_body(request, MAX_BODY_BYTES)
    try:
        return await http.off_loop(sns.loads, raw)  # a bracket walk: off the event loop
    except (ValueError, RecursionError) as exc:
        raise sns.Refused(f"the body is not an SNS message (JSON): {str(exc)[:100]}") from None


def _refused(reason: str) -> Response:
    # one answer for every reason: the sender learns nothing (which topics are allowed, which
    # check failed) until a signature verifies; the reason is in the log
    log.warning("SNS message refused: %s", reason)
    return http.Json({"error": "refused", "message": REFUSED}, status_code=403)


async def ses(request: Request) -> Response:
    """POST /webhooks/ses: verify the SNS message, then confirm, log or apply it."""
    feedback: Feedback | None = getattr(request.app.state, "feedback", None)
    if feedback is None:
        raise errors.NotFound("the SES webhook is off: set PGCAST_SNS_TOPIC_ARNS")
    try:
        message = await feedback.verifier.verify(await _body(request))
    except sns.Refused as exc:
        return _refused(str(exc))
    except sns.CertificateUnavailable as exc:
        log.warning("SNS signing certificate unavailable: %s", exc)
        raise errors.Unavailable("the signing certificate cannot be fetched; retry") from None
    kind, pool = message["Type"], context.pool(request)
    sent_at = dt.datetime.fromisoformat(message["Timestamp"])
    record = {"message_id": message["MessageId"], "topic": message["TopicArn"], "type": kind,
              "sent_at": sent_at}
    if kind == "Notification":
        return http.Json(await _apply(pool, feedback, message, sent_at, request))
    seen = await db.one(pool, "feedback_sns_seen", record)
    if seen is not None and seen["seen"]:
        return http.Json({"outcome": "duplicate"})
    if kind == "SubscriptionConfirmation":
        try:
            await feedback.verifier.get(message["SubscribeURL"])
        except (OSError, sns.Refused) as exc:
            log.warning("cannot confirm the subscription to %s: %s", message["TopicArn"], exc)
            raise errors.Unavailable("the subscription could not be confirmed; retry") from None
        log.info("confirmed the SNS subscription to %s", message["TopicArn"])
        outcome = "confirmed"
    else:
        log.warning("SNS unsubscribed this endpoint from %s", message["TopicArn"])
        outcome = "unsubscribed"
    await db.one(pool, "feedback_sns_record", record)
    return http.Json({"outcome": outcome})


async def _apply(pool: db.Pool, feedback: Feedback, message: dict[str, Any],
                 sent_at: dt.datetime, request: Request) -> dict[str, Any]:
    """One notification's SES event, applied once; the guard pauses its broadcast if due."""
    event = await http.off_loop(ses_events.parse, message["Message"], sent_at)
    limits = {"guard_min": feedback.guard_min, "max_bounce": feedback.max_bounce_rate,
              "max_complaint": feedback.max_complaint_rate}
    prune_before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=feedback.verifier.max_age)
    row = await db.one(pool, "feedback_ses_event", {
        "message_id": message["MessageId"], "topic": message["TopicArn"], "sent_at": sent_at,
        "prune_before": prune_before, "event": event.event if event else "unknown",
        "broadcast": event.broadcast if event else None,
        "contact": event.contact if event else None,
        "addresses": event.addresses if event else [], "detail": event.detail if event else None,
        "at": event.at if event else sent_at, "soft_limit": feedback.soft_bounce_limit,
        "ses_message_id": event.message_id if event else None, **limits})
    assert row is not None  # the function always answers one row
    out: dict[str, Any] = {"outcome": row["outcome"]}
    if event is not None and event.message_id and row["outcome"] != "duplicate":
        if event.message is not None:  # an unknown message never learned SES's id
            await db.rowcount(pool, "message_learn_provider_id", {
                "id": event.message, "provider_id": event.message_id})
        # a transactional message's feedback, by SES's message id (0017)
        noted = await db.one(pool, "message_feedback", {
            "provider_id": event.message_id, "event": event.event, "at": event.at,
            "detail": event.detail})
        if noted is not None and noted["id"] is not None:
            out["message"] = str(noted["id"])
    if row["reconciled"] is not None:  # an unknown recipient resolved by this event
        out["reconciled"] = row["reconciled"]
    if row["outcome"] == "logged" and event is not None:
        log.info("SES %s without pgcast tags for %s: logged, not applied", event.event,
                 ", ".join(event.addresses) or "no address")
    if event is not None and event.event in ("open", "click") and row["outcome"] != "duplicate":
        await tracking_routes.record_ses(request.app, event)  # counted with pgcast's own
    if row["guard"] is not None:
        paused = await db.one(pool, "feedback_guard", {"id": row["broadcast_id"], **limits})
        if paused is not None and paused["reason"] is not None:
            log.warning("broadcast %s paused by the reputation guard: %s",
                        row["broadcast_id"], paused["reason"])
            out["paused"] = paused["reason"]
    return out
