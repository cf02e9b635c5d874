"""The OpenAPI 3.1 document of every route (tests check it against the app and fuzz it)."""

from __future__ import annotations

from typing import Any

from pgcast.api import forms as forms_routes

BROADCAST_STATUSES = ["draft", "scheduled", "sending", "paused", "sent", "failed",
                      "cancelled"]
RECIPIENT_STATUSES = ["pending", "claimed", "sending", "sent", "failed", "skipped", "unknown",
                      "cancelled"]
JSON = "application/json"

STR = {"type": "string"}
INT = {"type": "integer", "minimum": 0}
STR_OR_NULL = {"type": ["string", "null"]}
TIME = {"type": "string", "format": "date-time"}
TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
FAILED_REASON = {"enum": ["missed_window", "empty_segment", "invalid_segment", None],
                 "description": "why a scheduled start failed"}


def ref(name: str) -> dict[str, str]:
    """A $ref to a component schema."""
    return {"$ref": f"#/components/schemas/{name}"}


IN_DOUBT = {"type": "integer", "minimum": 0, "description": "with include_unknown: unknown "
            "recipients left as they are, handed off too recently (their call may still be "
            "answered)"}


def obj(props: dict[str, Any], required: list[str] | None = None,
        closed: bool = True) -> dict[str, Any]:
    """An object schema; required defaults to every property."""
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": list(props) if required is None else required}
    if closed:
        out["additionalProperties"] = False
    return out


COUNTERS = {k: INT for k in ("total", "sent", "failed", "skipped", "unknown", "cancelled",
                             "pending")}
FILTER = {"type": "object", "description": "a segment filter (docs/segments.md): "
          "{\"tag\": T}, {\"attribute\": A, \"eq\": V}, {\"all\": [...]}, ..."}
FILTER_OR_NULL = {**FILTER, "type": ["object", "null"]}
FILTER_USED = {**FILTER_OR_NULL, "description": "the filter the send evaluated (saved segments "
               "expanded), frozen at send; null before"}
SEGMENT_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}
SUMMARY = {"id": {"type": "string", "format": "uuid"},
           "status": {"enum": BROADCAST_STATUSES}, "subject": STR, "tag": STR_OR_NULL,
           "filter": {**FILTER_OR_NULL, "description": "its audience as given: a filter, or "
                      "{\"segment\": NAME} (null: its tag, or every contact)"},
           "filter_used": FILTER_USED,
           **COUNTERS, "created_at": TIME, "started_at": TIME_OR_NULL,
           "finished_at": TIME_OR_NULL, "scheduled_at": TIME_OR_NULL}
PRIORITY = {"type": "integer", "minimum": 1, "maximum": 10, "description":
            "its weight among its account's sending broadcasts when the rate limit is the "
            "constraint (default 1)"}
CONTENT = {"subject": {"type": "string", "minLength": 1, "maxLength": 998,
                       "description": "one line"},
           "from": {"type": "string", "minLength": 1,
                    "description": "`addr@example.com` or `Name <addr@example.com>`"},
           "text": {**STR_OR_NULL, "description": "plain-text body; text or html is required"},
           "html": {**STR_OR_NULL, "description": "HTML body; text or html is required"},
           "tag": {"type": ["string", "null"], "maxLength": 100,
                   "description": "send only to contacts with this tag (null: every contact)"},
           "segment": {"type": ["string", "null"], "description": "send to a saved segment "
                       "(its definition at send); one of tag, segment, filter"},
           "filter": {**FILTER_OR_NULL, "description": "send to the contacts this filter "
                      "selects at send; one of tag, segment, filter"},
           "priority": PRIORITY}

TRACK = {"enum": ["none", "aggregate", "contact"], "description":
         "opens and clicks: none, aggregate (counts only) or contact (per person); default: "
         "the account's default (`pgcast tracking default`), else none (docs/tracking.md)"}
SUPPRESSION_REASONS = ["bounce", "soft_bounce", "complaint"]
FEEDBACK_COUNTERS = {
    "delivered": {**INT, "description": "recipients SES reported delivered"},
    "bounced": {**INT, "description": "recipients that bounced permanently (hard bounces)"},
    "complained": {**INT, "description": "recipients who complained (marked it spam)"}}
FEEDBACK_SCHEMAS: dict[str, Any] = {
    "Suppressed": obj({"email": STR, "reason": {"enum": SUPPRESSION_REASONS},
                       "detail": STR_OR_NULL, "suppressed_at": TIME,
                       "soft_bounces": INT, "unsubscribed_at": TIME_OR_NULL}),
    "SuppressedPage": obj({"contacts": {"type": "array", "items": ref("Suppressed")},
                           "next_cursor": STR_OR_NULL}),
    "Unsuppressed": obj({"success": {"const": True}, "email": STR,
                         "was": {"enum": SUPPRESSION_REASONS}, "message": STR}),
    "NotSuppressed": obj({"success": {"const": False}, "email": STR, "message": STR}),
    "WebhookResult": obj({"outcome": {"enum": [
        "applied", "duplicate", "ignored", "logged", "unmatched", "confirmed", "unsubscribed"]},
        "paused": {"enum": ["bounce_rate", "complaint_rate"]},
        "message": {**STR, "description": "the transactional message the event is about"}},
        ["outcome"]),
}

SCHEMAS: dict[str, Any] = {
    "Error": obj({"error": STR, "message": STR,
                  "details": {"type": "array", "items": obj({"field": STR, "problem": STR})}},
                 ["error", "message"]),
    "Conflict": obj({"success": {"const": False},
                     "status": {"enum": [*BROADCAST_STATUSES, "empty"],
                                "description": "the current status, or `empty`: nobody to "
                                               "send to (send with allow_empty to send anyway)"},
                     "queued": INT, "message": STR}, ["success", "status", "message"]),
    "SendIn": obj({"allow_empty": {"type": "boolean", "description": "send even when no "
                                   "subscribed contact matches (default false)"}}, []),
    "Health": obj({"status": {"const": "ok"}}),
    "ContactIn": obj({"email": STR, "name": STR_OR_NULL,
                      "tags": {"type": ["array", "null"], "items": STR},
                      "attributes": {"type": ["object", "null"],
                                     "description": "flat: string, number or boolean values; "
                                                    "merged into the stored ones"}}, ["email"]),
    "ContactsIn": obj({"contacts": {"type": "array", "maxItems": 10000,
                                    "items": ref("ContactIn")}}),
    "ContactsResult": obj({"upserted": INT, "rejected": {"type": "array", "items": obj(
        {"index": INT, "email": STR, "reason": STR})}}),
    "UnsubscribeIn": obj({"email": STR}),
    "Unsubscribed": obj({"success": {"const": True}, "email": STR, "unsubscribed_at": TIME}),
    "BroadcastCreate": obj({**CONTENT, "track": TRACK, "archive": {
        "type": "boolean", "description": "list it, once sent, on the account's public archive "
                                          "page (/a/{slug}); default false"}},
        ["subject", "from"]),
    "BroadcastPatch": {**obj(CONTENT, []), "minProperties": 1},
    "BroadcastSummary": obj(SUMMARY),
    "Broadcast": obj({**SUMMARY, "from": STR, "text": STR_OR_NULL, "html": STR_OR_NULL,
                      "paused_reason": STR_OR_NULL, "priority": PRIORITY, "updated_at": TIME,
                      "not_after": TIME_OR_NULL, "track": TRACK,
                      "failed_reason": FAILED_REASON}),
    "BroadcastWritten": obj({**SUMMARY, "from": STR, "text": STR_OR_NULL, "html": STR_OR_NULL,
                             "paused_reason": STR_OR_NULL, "priority": PRIORITY,
                             "updated_at": TIME, "track": TRACK,
                             "not_after": TIME_OR_NULL, "failed_reason": FAILED_REASON,
                             "warnings": {"type": "array", "items": STR, "description":
                                          "what to fix, though the draft was saved"}}),
    "Preview": obj({"contact": STR, "sample": {"type": "boolean"}, "subject": STR,
                    "text": STR_OR_NULL, "html": STR_OR_NULL,
                    "headers": {"type": "object", "additionalProperties": STR}}),
    "TestSendIn": obj({"to": {"type": "array", "minItems": 1, "maxItems": 5, "items": STR},
                       "contact": {**STR_OR_NULL, "description":
                                   "whose data fills the template (default: a sample contact)"}},
                      ["to"]),
    "TestSends": obj({"test_sends": {"type": "array", "items": obj(
        {"id": INT, "to": STR, "status": {"enum": ["queued", "sending", "sent", "failed"]},
         "message_id": STR_OR_NULL, "error": STR_OR_NULL}, ["id", "to", "status"])}}),
    "BroadcastPage": obj({"broadcasts": {"type": "array", "items": ref("BroadcastSummary")},
                          "next_cursor": STR_OR_NULL}),
    "SendResult": obj({"success": {"const": True}, "status": {"enum": ["sending", "sent"]},
                       "queued": INT, "message": STR}),
    "CancelResult": obj({"success": {"const": True}, "status": {"const": "cancelled"},
                         "alreadyQueued": INT, "message": STR}),
    "ControlResult": obj({"success": {"const": True}, "status": {"enum": ["paused", "sending"]},
                          "message": STR}),
    "Progress": obj({"status": {"enum": BROADCAST_STATUSES}, **{
        k: INT for k in ("total", "pending", "sent", "failed", "skipped", "unknown", "cancelled")},
        **FEEDBACK_COUNTERS,
        "rate": {"type": ["number", "null"], "minimum": 0,
                 "description": "emails/s finished in the current run: since started_at, "
                                "or since the last retry"},
        "eta_seconds": {"type": ["integer", "null"], "minimum": 0},
        "scheduled_at": TIME_OR_NULL, "filter_used": FILTER_USED,
        "share_per_second": {"type": ["number", "null"], "minimum": 0, "description":
                             "its fair share of the global rate among the broadcasts taking "
                             "tokens now; null when it takes none"},
        "unknown_resolved": {**INT, "description": "recipients that were unknown and an SES "
                             "event resolved (sent or failed); `unknown` counts those still open"},
        "unknown_requeued": {**INT, "description": "unknown recipients requeued once for want "
                             "of an SES event (PGCAST_RECONCILE_AFTER)"}}),
    "Recipient": obj({"email": STR, "status": {"enum": RECIPIENT_STATUSES},
                      "attempts": INT, "last_error": STR_OR_NULL, "sent_at": TIME_OR_NULL}),
    "ScheduleIn": obj({"at": {**STR, "description": "ISO 8601 with an offset, at most a "
                                                      "minute in the past"},
                       "not_after": {**STR_OR_NULL, "description": "latest start (ISO 8601 "
                                     "with an offset, not earlier than at)"}}, ["at"]),
    "ScheduleResult": obj({"success": {"const": True}, "status": {"const": "scheduled"},
                           "scheduled_at": TIME, "not_after": TIME_OR_NULL, "message": STR}),
    "UnscheduleResult": obj({"success": {"const": True}, "status": {"const": "draft"},
                             "message": STR}),
    "RetryIn": obj({"include_unknown": {"type": "boolean", "description": "also requeue "
                                        "recipients whose outcome is unknown (default false), "
                                        "except those handed off less than the lease plus "
                                        "the provider's timeout ago (their call may still be "
                                        "answered)"}},
                   []),
    "RetryResult": obj({"success": {"const": True}, "status": {"const": "sending"},
                        "requeued": {"type": "integer", "minimum": 1}, "message": STR,
                        "in_doubt": IN_DOUBT},
                       ["success", "status", "requeued", "message"]),
    "RetryConflict": obj({"success": {"const": False}, "status": {"enum": BROADCAST_STATUSES},
                          "requeued": {"const": 0}, "message": STR, "in_doubt": IN_DOUBT},
                         ["success", "status", "requeued", "message"]),
    "RecipientPage": obj({"recipients": {"type": "array", "items": ref("Recipient")},
                          "next_cursor": STR_OR_NULL}),
    **FEEDBACK_SCHEMAS,
    # the dashboard's routes (api/dashboard_routes.py)
    "AuditLog": obj({"audit_log": {"type": "array", "items": {"type": "object"}}}),
    "Audience": obj({"status": {"enum": BROADCAST_STATUSES}, "tag": STR_OR_NULL,
                     "audience": INT}),
    "ImportResult": obj({"imported": INT, "rejected": {"type": "array", "items": obj(
        {"line": INT, "email": STR, "reason": STR})}}),
}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref(schema)}}}


ERRORS = {
    "400": _json("Error", "the body is not JSON, or a query parameter holds NUL "
                          "(bad_parameter)"),
    "401": _json("Error", "no valid bearer token"),
    "404": _json("Error", "no such broadcast in this account"),
    "409": _json("Conflict", "not allowed in the broadcast's current status; nothing changed"),
    "413": _json("Error", "the body is too large"),
    "415": _json("Error", "the body is not of the media type the route reads"),
    "422": _json("Error", "a wrong type, a missing or unknown field, or an invalid value"),
    "429": {**_json("Error", "too many progress streams open (this account, or this server), "
                             "or over the account's hourly test-send cap (50 messages)"),
            "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    "503": _json("Error", "Postgres is unreachable, or a lock stayed held past the wait "
                          "allowed (busy: an erase of the account runs)"),
}
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}


def op(summary: str, ok: tuple[str, dict[str, Any]], errors: str, *,
       body: str | None = None, params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One operation; `errors` lists the error statuses it may answer (plus 401 and 503)."""
    responses = {ok[0]: ok[1]}
    where = {p["in"] for p in params or []}
    # NUL in a query parameter is a 400, in a path parameter a 404 (api.http.check_url)
    implied = [code for code, place in (("400", "query"), ("404", "path")) if place in where]
    for code in [*errors.split(), *implied, "401", "503"]:
        responses[code] = ERRORS[code]
    out: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        out["parameters"] = params
    if body:
        out["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(body)}}}
    return out


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _paths() -> dict[str, Any]:
    body_errors = "400 413 422"
    control = "404 409"
    return {
        "/healthz": {"get": {
            "summary": "the API and its database answer (no auth)", "security": [],
            "responses": {"200": _json("Health", "healthy"), "503": ERRORS["503"]}}},
        "/openapi.json": {"get": op("this document", ("200", {
            "description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}}), "")},
        "/contacts": {"post": op("upsert contacts (at most 10,000)", (
            "200", _json("ContactsResult", "upserted, and invalid items by index")), body_errors,
            body="ContactsIn")},
        "/contacts/unsubscribe": {"post": op("unsubscribe a contact", (
            "200", _json("Unsubscribed", "unsubscribed")), f"{body_errors} 404",
            body="UnsubscribeIn")},
        "/broadcasts": {
            "post": op("create a draft", ("201", {
                **_json("BroadcastWritten", "the new draft"),
                "headers": {"Location": {"schema": STR, "description": "/broadcasts/{id}"}}}),
                       body_errors, body="BroadcastCreate"),
            "get": op("list broadcasts, newest first", ("200", _json("BroadcastPage", "a page")),
                      "422", params=[
                          _query("limit", {"type": "integer", "minimum": 1, "maximum": 200},
                                 "page size (default 50)"),
                          _query("cursor", STR, "next_cursor of the previous page")])},
        "/broadcasts/{id}": {
            "get": op("one broadcast", ("200", _json("Broadcast", "the broadcast")), "404",
                      params=[ID]),
            "patch": op("edit a draft or a scheduled broadcast",
                        ("200", _json("BroadcastWritten", "the edited broadcast")),
                        f"{body_errors} 404 409", body="BroadcastPatch", params=[ID]),
            "delete": op("delete a draft", ("204", {"description": "deleted"}), "404 409",
                         params=[ID])},
        "/broadcasts/{id}/send": {"post": {
            **op("snapshot the recipients and start sending", (
                "200", _json("SendResult", "queued")), f"{control} 400 413 422", params=[ID]),
            "requestBody": {"required": False, "content": {JSON: {"schema": ref("SendIn")}}}}},
        "/broadcasts/{id}/cancel": {"post": op(
            "cancel a draft, scheduled, sending or paused broadcast", (
            "200", _json("CancelResult", "cancelled")), control, params=[ID])},
        "/broadcasts/{id}/pause": {"post": op("pause a sending broadcast", (
            "200", _json("ControlResult", "paused")), control, params=[ID])},
        "/broadcasts/{id}/resume": {"post": op("resume a paused broadcast", (
            "200", _json("ControlResult", "sending again")), control, params=[ID])},
        "/broadcasts/{id}/progress": {"get": op("counters, rate and ETA, read in O(1)", (
            "200", _json("Progress", "progress")), "404", params=[ID])},
        "/broadcasts/{id}/events": {"get": op("progress as Server-Sent Events", ("200", {
            "description": "`progress` events on change, then one `done` event when the "
                           "broadcast is terminal (`gone` if a draft is deleted, `expired` "
                           "when the token expires)",
            "content": {"text/event-stream": {"schema": STR}}}), "404 429", params=[ID])},
        "/broadcasts/{id}/recipients": {"get": op("recipient rows, keyset-paged", (
            "200", _json("RecipientPage", "a page")), "404 422", params=[
                ID,
                _query("status", {"enum": RECIPIENT_STATUSES}, "only rows in this status"),
                _query("cursor", STR, "next_cursor of the previous page (opaque)"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                       "page size (default 100)")])},
        # the dashboard's routes (api/dashboard_routes.py)
        "/broadcasts/{id}/audit": {"get": op("the audit log: every transition, oldest first", (
            "200", _json("AuditLog", "the audit log")), "404", params=[ID])},
        "/broadcasts/{id}/audience": {"get": op(
            "how many contacts a send would reach now (segment, minus unsubscribed and "
            "suppressed)", ("200", _json("Audience", "the count")), "404", params=[ID])},
        "/contacts/import": {"post": {**op(
            "upsert contacts from a CSV body (email,name,tags), as `pgcast contacts import`", (
                "200", _json("ImportResult", "imported, and rejected rows by line")),
            "413 415 422"), "requestBody": {"required": True, "content": {
                "text/csv": {"schema": STR}}}}},
        "/broadcasts/{id}/preview": {"get": op(
            "the message one contact would receive (rendered subject, text, html, headers)", (
                "200", _json("Preview", "the rendered message")), "404 422", params=[
                ID, _query("contact", STR, "the contact's address (default: a sample contact "
                                           "of the account)")])},
        "/broadcasts/{id}/test": {
            "post": op("send the rendered message to at most 5 addresses, subject prefixed "
                       "`[TEST] ` (a running worker delivers it; not counted in progress)", (
                           "202", _json("TestSends", "queued")), f"{body_errors} 404 429",
                       body="TestSendIn", params=[ID]),
            "get": op("the outcome of test sends", ("200", _json("TestSends", "their status")),
                      "404 422", params=[
                          ID, _query("ids", STR, "test send ids, comma-separated")])},
        "/u/{token}": {
            "get": {"summary": "one-click unsubscribe: a page with one confirm button (never "
                               "unsubscribes; no auth)", "security": [],
                    "parameters": [TOKEN], "responses": {
                        "200": _html("the confirm page"),
                        "400": _html("the link is not valid (says nothing about the contact)")}},
            "post": {"summary": "one-click unsubscribe (RFC 8058): idempotent, no auth",
                     "security": [], "parameters": [TOKEN],
                     "requestBody": {"required": True, "content": {
                         "application/x-www-form-urlencoded": {"schema": obj(
                             {"List-Unsubscribe": {"const": "One-Click"}}, closed=False)},
                         "multipart/form-data": {"schema": obj(
                             {"List-Unsubscribe": {"const": "One-Click"}}, closed=False)}}},
                     "responses": {
                         "200": _html("unsubscribed (or already unsubscribed)"),
                         "400": _html("the link is not valid, or the body is not "
                                      "`List-Unsubscribe=One-Click`")}}},
        **_schedule_paths(),
    }


def _schedule_paths() -> dict[str, Any]:
    retry = op("send again to the failed (and, when asked, unknown) recipients of a finished "
               "broadcast", ("200", _json("RetryResult", "requeued")), "400 413 422 404",
               params=[ID])
    retry["requestBody"] = {"required": False, "content": {JSON: {"schema": ref("RetryIn")}}}
    retry["responses"]["409"] = _json("RetryConflict", "not finished, or nothing to retry")
    return {
        "/broadcasts/{id}/schedule": {"post": op("start a draft at a given time", (
            "200", _json("ScheduleResult", "scheduled")), "400 413 422 404 409",
            body="ScheduleIn", params=[ID])},
        "/broadcasts/{id}/unschedule": {"post": op("take a scheduled broadcast back to draft", (
            "200", _json("UnscheduleResult", "a draft again")), "404 409", params=[ID])},
        "/broadcasts/{id}/retry": {"post": retry},
        "/broadcasts/{id}/copy": {"post": op("a new draft with the same content and segment", (
            "201", {**_json("Broadcast", "the new draft"), "headers": {"Location": {
                "schema": STR, "description": "/broadcasts/{new id}"}}}), "404", params=[ID])},
    }


TOKEN = {"name": "token", "in": "path", "required": True, "schema": STR,
         "description": "the opaque token of the List-Unsubscribe link"}


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": STR}}}


def _feedback_paths() -> dict[str, Any]:
    """Suppression and the SES webhook (issue 14)."""
    unsuppress = op("lift a contact's suppression (audited)", (
        "200", _json("Unsuppressed", "lifted")), "400 413 422 404", body="UnsubscribeIn")
    unsuppress["responses"]["409"] = _json("NotSuppressed", "the contact is not suppressed")
    return {
        "/contacts/suppressed": {"get": op("suppressed contacts, keyset-paged", (
            "200", _json("SuppressedPage", "a page")), "422", params=[
                _query("reason", {"enum": SUPPRESSION_REASONS}, "only this reason"),
                _query("cursor", STR, "next_cursor of the previous page (opaque)"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                       "page size (default 100)")])},
        "/contacts/unsuppress": {"post": unsuppress},
        "/webhooks/ses": {"post": {
            "summary": "Amazon SNS deliveries of SES events (no JWT: the SNS signature)",
            "security": [],
            "requestBody": {"required": True, "content": {"text/plain": {"schema": STR},
                                                          JSON: {"schema": {"type": "object"}}}},
            "responses": {
                "200": _json("WebhookResult", "verified; applied once, or a duplicate"),
                "400": ERRORS["400"], "413": ERRORS["413"],
                "403": _json("Error", "refused: signature, topic, age or certificate URL"),
                "404": _json("Error", "the webhook is off (PGCAST_SNS_TOPIC_ARNS unset)"),
                "503": _json("Error", "Postgres or the signing certificate is unreachable")}}},
    }


# -- what an operator reaches for: contacts listed, resubscribed, erased -------------------

CONTACT_STATUSES = ["subscribed", "unsubscribed", "suppressed", "unconfirmed"]
SCHEMAS.update({
    "Contact": obj({"email": STR, "name": STR, "tags": {"type": "array", "items": STR},
                    "attributes": {"type": "object"}, "status": {"enum": CONTACT_STATUSES},
                    "unsubscribed_at": TIME_OR_NULL,
                    "suppressed_reason": {"enum": ["bounce", "soft_bounce", "complaint", None]},
                    "created_at": TIME}),
    "ContactPage": obj({"contacts": {"type": "array", "items": ref("Contact")},
                        "next_cursor": STR_OR_NULL}),
    "EmailIn": obj({"email": STR}),
    "Resubscribed": obj({"success": {"const": True}, "email": STR, "resubscribed": {
        "type": "boolean"}, "suppressed": {"type": "boolean"}, "message": STR}),
    "Erased": obj({"success": {"const": True}, "erased": {"type": "boolean"},
                   "recipient_rows": INT, "message": STR}),
})


def _with_operator_routes(paths: dict[str, Any]) -> dict[str, Any]:
    paths["/contacts"]["get"] = op("list contacts by address, keyset-paged", (
        "200", _json("ContactPage", "a page")), "422", params=[
            _query("tag", STR, "only contacts with this tag"),
            _query("status", {"enum": CONTACT_STATUSES}, "only contacts in this status"),
            _query("cursor", STR, "next_cursor of the previous page"),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                   "page size (default 100)")])
    paths["/contacts/resubscribe"] = {"post": op(
        "clear a contact's unsubscribe (recorded in contact_events)", (
            "200", _json("Resubscribed", "resubscribed, or it was not unsubscribed")),
        "400 413 422 404", body="EmailIn")}
    paths["/contacts/erase"] = {"post": op(
        "erase a person's data; a hash is kept so a re-import is refused", (
            "200", _json("Erased", "erased (or the address is now refused)")),
        "400 413 422", body="EmailIn")}
    return paths


INT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
_COUNTS = obj({"total": INT_OR_NULL, "human": INT_OR_NULL, "machine": INT_OR_NULL,
               "unique": {**INT_OR_NULL, "description": "people (contact mode only)"}})
SCHEMAS["Stats"] = obj({
    "id": STR, "status": {"enum": BROADCAST_STATUSES}, "track": TRACK,
    **{k: INT for k in ("total", "sent", "delivered", "bounced", "complained",
                        "unsubscribed")},
    "opens": _COUNTS, "clicks": _COUNTS,
    "links": {"type": "array", "items": obj({
        "index": INT, "url": STR, "clicks": INT_OR_NULL, "human": INT_OR_NULL,
        "machine": INT_OR_NULL, "unique": INT_OR_NULL})},
    "series": {"type": "array", "items": obj({
        "hour": TIME, "kind": {"enum": ["open", "click"]}, "human": INT, "machine": INT})}})


def _tracking_paths() -> dict[str, Any]:
    """Opens, clicks and the report (issue 29)."""
    token = {**TOKEN, "description": "the signed token of a tracked link or open image"}
    return {
        "/c/{token}": {"get": {
            "summary": "a tracked link: 302 to the URL stored for it (no auth)", "security": [],
            "parameters": [token], "responses": {
                "302": {"description": "to the link's stored URL"},
                "404": _html("not a link pgcast made")}}},
        "/o/{token}": {"get": {
            "summary": "the open image: a 1x1 GIF (no auth)", "security": [],
            "parameters": [token], "responses": {
                "200": {"description": "a 1x1 GIF",
                        "content": {"image/gif": {"schema": STR}}},
                "404": _html("not an image pgcast made")}}},
        "/broadcasts/{id}/stats": {"get": op(
            "delivery, opens, clicks (human and machine), per link, and per hour",
            ("200", _json("Stats", "the report")), "404", params=[ID])},
    }


SCHEMAS.update({
    "Segment": obj({"name": SEGMENT_NAME, "filter": FILTER, "created_at": TIME,
                    "updated_at": TIME}),
    "SegmentIn": obj({"name": SEGMENT_NAME, "filter": FILTER}),
    "SegmentList": obj({"segments": {"type": "array", "items": ref("Segment")}}),
    "SegmentInUse": obj({"success": {"const": False}, "name": STR,
                         "used_by": {"type": "array", "items": STR}, "message": STR}),
    "CountIn": obj({"filter": FILTER}),
    "Count": obj({"count": INT}),
})
NAME = {"name": "name", "in": "path", "required": True, "schema": STR,
        "description": "the saved segment's name"}


def _segment_paths() -> dict[str, Any]:
    """Saved segments and live counts (issue 27)."""
    delete = op("delete a saved segment", ("204", {"description": "deleted"}), "404",
                params=[NAME])
    delete["responses"]["409"] = _json("SegmentInUse", "a saved segment, a draft or a "
                                       "scheduled broadcast refers to it")
    save = op("save a segment (create or replace)", ("201", _json("Segment", "created")),
              "400 413 422", body="SegmentIn")
    save["responses"]["200"] = _json("Segment", "replaced")
    return {
        "/segments": {
            "get": op("the account's saved segments by name",
                      ("200", _json("SegmentList", "the segments")), ""),
            "post": save},
        "/segments/count": {"post": op(
            "how many mailable contacts a filter selects now",
            ("200", _json("Count", "the count")), "400 413 422", body="CountIn")},
        "/segments/{name}": {
            "get": op("one saved segment", ("200", _json("Segment", "the segment")), "404",
                      params=[NAME]),
            "delete": delete},
    }


SCHEMAS.update(forms_routes.openapi_schemas(obj, ref))


MESSAGE_STATUSES = ["queued", "sending", "sent", "failed", "unknown", "skipped"]
SCHEMAS.update({
    "MessageIn": obj({
        "to": {**STR, "description": "one address"},
        "from": {**STR, "description": "`addr@example.com` or `Name <addr@example.com>` "
                 "(the account's senders rule applies)"},
        "subject": {**STR, "description": "one line; or give a template"},
        "text": {**STR_OR_NULL, "description": "plain-text body; text or html is required "
                 "unless a template is given"},
        "html": {**STR_OR_NULL, "description": "HTML body"},
        "template": {"type": ["object", "null"], "description": "subject, text and/or html "
                     "rendered with `{{ data.name }}` under the render budget",
                     "properties": {"subject": STR, "text": STR_OR_NULL, "html": STR_OR_NULL},
                     "required": ["subject"], "additionalProperties": False},
        "data": {"type": ["object", "null"], "description": "the template's data"},
        "reply_to": {**STR_OR_NULL, "description": "one address, Reply-To"},
        "headers": {"type": ["object", "null"], "additionalProperties": STR, "description":
                    "In-Reply-To, References, X-Entity-Ref-ID, or X-... other than X-Pgcast-, "
                    "X-SES- and X-Amz- (at most 20)"},
        "tags": {"type": ["object", "null"], "additionalProperties": STR, "description":
                 "SES EmailTags (at most 10; letters, digits, _ and -)"},
        "category": {"enum": ["transactional", "marketing", "confirmation", None],
                     "description": "transactional (default) and confirmation go to "
                     "unsubscribed contacts; marketing does not"},
        "idempotency_key": {**STR_OR_NULL, "description": "unique per account: the same key "
                            "again answers 200 with the first message"}}, ["to", "from"]),
    "MessageQueued": obj({"id": {"type": "string", "format": "uuid"},
                          "status": {"enum": MESSAGE_STATUSES}}),
    "Message": obj({"id": {"type": "string", "format": "uuid"},
                    "status": {"enum": MESSAGE_STATUSES},
                    "category": {"enum": ["transactional", "marketing", "confirmation"]},
                    "to": STR, "from": STR, "subject": STR, "idempotency_key": STR_OR_NULL,
                    "attempts": INT, "error": STR_OR_NULL, "provider_message_id": STR_OR_NULL,
                    "created_at": TIME, "handed_at": TIME_OR_NULL, "sent_at": TIME_OR_NULL,
                    "finished_at": TIME_OR_NULL, "delivered_at": TIME_OR_NULL,
                    "bounced_at": TIME_OR_NULL, "complained_at": TIME_OR_NULL,
                    "feedback_detail": STR_OR_NULL}),
})


def _message_paths() -> dict[str, Any]:
    """Transactional messages (issue 26)."""
    create = op("queue one transactional message (a running worker sends it)", (
        "202", _json("MessageQueued", "queued (or skipped: an erased address)")),
        "400 413 422", body="MessageIn")
    create["responses"]["200"] = _json("Message", "the idempotency key named an earlier "
                                       "message: that one, never a second send")
    return {
        "/messages": {"post": create},
        "/messages/{id}": {"get": op("one message's status, attempts, error, provider id, "
                                     "times and feedback", ("200", _json("Message", "it")),
                                     "404", params=[ID])},
    }


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    from pgcast.api import hooks_openapi  # outgoing webhooks; it uses this module's helpers

    return {
        "openapi": "3.1.0",
        "info": {"title": "pgcast", "version": "1",
                 "description": "Email broadcasts on Postgres. Every route but /healthz needs "
                                "`Authorization: Bearer <JWT>` with `sub` and `account` claims; "
                                "everything is scoped to the token's account."},
        "paths": _with_operator_routes({**_paths(), **_feedback_paths(),
                                        **_segment_paths(),
                                        **forms_routes.openapi_paths(op, _json, ID),
                                        **_message_paths(), **hooks_openapi.paths(),
                                        **_tracking_paths()}),
        "components": {"schemas": {**SCHEMAS, **hooks_openapi.SCHEMAS}, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
        "security": [{"bearer": []}],
    }
