"""Sign-up forms and preference topics of the token's account: POST/GET /forms,
DELETE /forms/{id}, POST/GET /topics, DELETE /topics/{tag}."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pgcast.api import auth, context, db, errors, http
from pgcast.api import unsubscribe as unsubscribe_routes
from pgcast.sql import errors as sql_errors
from pgcast.sql import subscribers

FORM_OPTIONAL = {"tags": http.ARRAY_OR_NULL, "double_opt_in": http.BOOLEAN,
                 "redirect": http.STRING_OR_NULL, "embeddable": http.BOOLEAN}


def _form_json(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(row["id"]), "url": f"{unsubscribe_routes.configured_url()}/f/{row['id']}",
            "name": row["name"], "tags": row["tags"], "from": row["from_address"],
            "double_opt_in": row["double_opt_in"], "redirect": row["redirect_url"],
            "embeddable": row["embeddable"], "created_at": row["created_at"]}


async def create(request: Request) -> Response:
    """POST /forms: a new form; 201 with its id and public url."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body",
                       {"name": http.STRING, "from": http.STRING}, FORM_OPTIONAL)
    pool = context.pool(request)
    allowed = await db.one(pool, "account_senders", {"account": who.account})
    try:
        params = subscribers.form_params(
            who.account, body["name"], body.get("tags"), body["from"],
            double_opt_in=body.get("double_opt_in", True), redirect_url=body.get("redirect"),
            embeddable=body.get("embeddable", False),
            allowed=list(allowed["senders"]) if allowed else [])
    except sql_errors.InvalidInput as exc:
        raise errors.InvalidBody(str(exc)) from None
    row = await db.one(pool, "form_create", params)
    if row is None:
        raise errors.InvalidBody(f"the account already has a form named {params['name']!r}")
    return http.Json(_form_json(row), status_code=201)


async def list_forms(request: Request) -> Response:
    """GET /forms: the account's forms by name."""
    who = auth.principal(request)
    rows = await db.all_rows(context.pool(request), "forms_list", {"account": who.account})
    return http.Json({"forms": [_form_json(r) for r in rows]})


async def delete(request: Request) -> Response:
    """DELETE /forms/{id}: 204; its confirmation links then confirm nothing."""
    who = auth.principal(request)
    try:
        form_id = subscribers.parse_form_id(request.path_params["id"])
    except sql_errors.NotFound:
        raise errors.NotFound("form not found") from None
    row = await db.one(context.pool(request), "form_delete",
                       {"account": who.account, "id": form_id})
    if row is None:
        raise errors.NotFound("form not found")
    return Response(status_code=204)


async def add_topic(request: Request) -> Response:
    """POST /topics: offer a tag on the preference page (again: relabel it)."""
    who = auth.principal(request)
    body = http.fields(await http.read_json(request), "body",
                       {"tag": http.STRING, "label": http.STRING})
    try:
        params = subscribers.topic_params(who.account, body["tag"], body["label"])
    except sql_errors.InvalidInput as exc:
        raise errors.InvalidBody(str(exc)) from None
    row = await db.one(context.pool(request), "topic_add", params)
    assert row is not None
    return http.Json(dict(row))


async def list_topics(request: Request) -> Response:
    """GET /topics: the account's topics by tag."""
    who = auth.principal(request)
    rows = await db.all_rows(context.pool(request), "topics_list", {"account": who.account})
    return http.Json({"topics": [dict(r) for r in rows]})


async def remove_topic(request: Request) -> Response:
    """DELETE /topics/{tag}: 204; contacts keep the tag."""
    who = auth.principal(request)
    row = await db.one(context.pool(request), "topic_remove",
                       {"account": who.account, "tag": request.path_params["tag"]})
    if row is None:
        raise errors.NotFound("topic not found")
    return Response(status_code=204)


def routes(route: Callable[..., Route]) -> list[Route]:
    """The JSON routes, made with api.app.route (query parameters checked as everywhere)."""
    return [route("/forms", GET=list_forms, POST=create),
            route("/forms/{id}", DELETE=delete),
            route("/topics", GET=list_topics, POST=add_topic),
            route("/topics/{tag}", DELETE=remove_topic)]


def openapi_paths(op: Callable[..., dict[str, Any]], json_response: Callable[..., Any],
                  param_id: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI operations of these routes."""
    tag = {"name": "tag", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/forms": {
            "get": op("the account's sign-up forms", ("200", json_response("Forms", "forms")),
                      ""),
            "post": op("a new sign-up form (double opt-in unless double_opt_in is false)",
                       ("201", json_response("Form", "created")), "400 413 422",
                       body="FormIn")},
        "/forms/{id}": {"delete": op("delete a form", ("204", {"description": "deleted"}),
                                     "404", params=[param_id])},
        "/topics": {
            "get": op("the account's preference topics",
                      ("200", json_response("Topics", "topics")), ""),
            "post": op("offer a tag on the preference page (again: relabel it)",
                       ("200", json_response("Topic", "added")), "400 413 422",
                       body="TopicIn")},
        "/topics/{tag}": {"delete": op("stop offering a tag (contacts keep it)",
                                       ("204", {"description": "removed"}), "404",
                                       params=[tag])},
    }


def openapi_schemas(obj: Callable[..., dict[str, Any]], ref: Callable[[str], Any]
                    ) -> dict[str, Any]:
    """The OpenAPI schemas of these routes."""
    s = {"type": "string"}
    s_or_null = {"type": ["string", "null"]}
    tags = {"type": "array", "items": s}
    time = {"type": "string", "format": "date-time"}
    return {
        "FormIn": obj({"name": s, "from": s, "tags": {"type": ["array", "null"], "items": s},
                       "double_opt_in": {"type": "boolean"}, "redirect": s_or_null,
                       "embeddable": {"type": "boolean"}}, required=["name", "from"]),
        "Form": obj({"id": {"type": "string", "format": "uuid"}, "url": s, "name": s,
                     "tags": tags, "from": s, "double_opt_in": {"type": "boolean"},
                     "redirect": s_or_null, "embeddable": {"type": "boolean"},
                     "created_at": time}),
        "Forms": obj({"forms": {"type": "array", "items": ref("Form")}}),
        "TopicIn": obj({"tag": s, "label": s}),
        "Topic": obj({"tag": s, "label": s, "created_at": time}),
        "Topics": obj({"topics": {"type": "array", "items": ref("Topic")}}),
    }
