"""The OpenAPI part of the outgoing webhooks' routes (api/hooks.py)."""

from __future__ import annotations

from typing import Any

from pgcast.api.openapi import (
    ID,
    INT,
    STR,
    STR_OR_NULL,
    TIME,
    TIME_OR_NULL,
    _json,
    _query,
    obj,
    op,
    ref,
)
from pgcast.sql import hooks

EVENTS = {"type": "array", "minItems": 1,
          "items": {"enum": [*hooks.EVENT_TYPES, hooks.ALL]}}
ENDPOINT = {"id": {"type": "string", "format": "uuid"}, "account": STR, "url": STR,
            "events": EVENTS, "enabled": {"type": "boolean"}, "created_at": TIME}
SCHEMAS: dict[str, Any] = {
    "WebhookIn": obj({"url": {"type": "string", "maxLength": hooks.MAX_URL,
                              "description": "https URL of the receiver"},
                      "events": EVENTS}),
    "WebhookCreated": obj({**ENDPOINT, "secret": {
        "type": "string", "description": "the signing secret: shown in this answer only"}}),
    "Webhook": obj({**ENDPOINT, "disabled_at": TIME_OR_NULL, "disabled_reason": STR_OR_NULL,
                    "secret_rotated_at": TIME_OR_NULL, "pending": INT}),
    "WebhookList": obj({"webhooks": {"type": "array", "items": ref("Webhook")}}),
    "WebhookSecret": obj({"id": {"type": "string", "format": "uuid"},
                          "secret_rotated_at": TIME, "secret": STR}),
    "WebhookEnabled": obj({"id": {"type": "string", "format": "uuid"},
                           "enabled": {"const": True}}),
    "WebhookDelivery": obj({
        "id": {"type": "integer"}, "event_id": {"type": "string", "format": "uuid"},
        "event_type": STR, "status": {"enum": ["pending", "delivered", "failed"]},
        "attempts": INT, "created_at": TIME, "next_attempt_at": TIME,
        "last_attempt_at": TIME_OR_NULL, "last_status": {"type": ["integer", "null"]},
        "last_error": STR_OR_NULL, "latency_ms": {"type": ["number", "null"]},
        "response": {**STR_OR_NULL, "description": "the first 1 KiB of the answer"},
        "delivered_at": TIME_OR_NULL}),
    "WebhookDeliveryPage": obj({
        "deliveries": {"type": "array", "items": ref("WebhookDelivery")},
        "next_before": {"type": ["integer", "null"],
                        "description": "pass as ?before= for the next (older) page"}}),
    "WebhookRedelivery": obj({"id": {"type": "integer"},
                              "event_id": {"type": "string", "format": "uuid"},
                              "status": {"const": "pending"}}),
}
DELIVERY_ID = {"name": "delivery_id", "in": "path", "required": True,
               "schema": {"type": "integer", "minimum": 1}}


def paths() -> dict[str, Any]:
    """/webhooks and below."""
    created = op("add a webhook endpoint; the answer holds its secret, shown once", (
        "201", _json("WebhookCreated", "created")), "400 413 422", body="WebhookIn")
    gone = op("remove an endpoint and its deliveries", (
        "204", {"description": "removed"}), "", params=[ID])
    return {
        "/webhooks": {"get": op("the account's webhook endpoints (never their secrets)", (
            "200", _json("WebhookList", "the endpoints")), ""), "post": created},
        "/webhooks/{id}": {"delete": gone},
        "/webhooks/{id}/rotate-secret": {"post": op(
            "a new signing secret, shown once (the old one stops signing at once)", (
                "200", _json("WebhookSecret", "rotated")), "", params=[ID])},
        "/webhooks/{id}/enable": {"post": op(
            "deliver to a disabled endpoint again (its pending deliveries resume in order)", (
                "200", _json("WebhookEnabled", "enabled")), "", params=[ID])},
        "/webhooks/{id}/deliveries": {"get": op("the delivery log, newest first", (
            "200", _json("WebhookDeliveryPage", "a page")), "422", params=[
                ID, _query("before", {"type": "integer", "minimum": 0},
                           "next_before of the previous page"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                       "page size (default 100)")])},
        "/webhooks/{id}/deliveries/{delivery_id}/redeliver": {"post": op(
            "deliver that event again: a new delivery at the end of the endpoint's queue", (
                "202", _json("WebhookRedelivery", "queued")), "", params=[ID, DELIVERY_ID])},
    }
