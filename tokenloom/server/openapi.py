"""The OpenAPI document, made true to what the server answers: FastAPI lists only 200 and 422, while every
error here is OpenAI's JSON shape with 400 (never 422), 401 (behind an API key), 403, 404, 408, 409, 413, 500 or
503; a streamed completion is a server-sent event stream, /metrics Prometheus text, and behind an API key every
operation but the open ones requires the Bearer scheme."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from tokenloom.server.middleware import OPEN_PATHS

REF = "#/components/schemas/"
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
SECURITY_SCHEME = "bearerAuth"
_WHY = {400: "Invalid request: the message names the parameter", 401: "Missing or wrong API key",
        403: "Not allowed on this server (an adapter path outside --adapter-dir)",
        404: "Unknown model or route", 408: "The request body did not arrive in time",
        409: "The model is busy", 413: "Request body too large", 500: "Server error (details in the server log)",
        503: "Busy (retry after Retry-After seconds), shutting down, or out of memory for the model"}
# Models that only appear inside a documented event stream: FastAPI does not put them in the components.
_STREAMED: dict[str, type[BaseModel]] = {}


def event_stream(chunk: type[BaseModel]) -> dict[str, Any]:
    """The `text/event-stream` media type of a streamed answer, for a route's `responses`: each event's data is
    a `chunk` as JSON, an error in OpenAI's shape (the stream then ends), or the final `[DONE]`. As Schemathesis
    reads an OpenAPI 3.1 document, the schema describes one event (`data`, `event`, `id`, `retry`)."""
    _STREAMED[chunk.__name__] = chunk
    data = {"anyOf": [{"const": "[DONE]"}, {
        "type": "string", "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [{"$ref": REF + chunk.__name__}, {"$ref": REF + "ErrorResponse"}]}}]}
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "properties": {"data": data},
        "description": f"one server-sent event: a {chunk.__name__} or an error as JSON, or [DONE]"}}}


def install_openapi(app: FastAPI, api_key: bool) -> None:
    """Replace `app.openapi` with a document that lists each operation's error responses (and, with an API
    key, its security requirement)."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas["ErrorResponse"] = ERROR_SCHEMA
            for chunk in _STREAMED.values():
                _add_model(schemas, chunk)
            for name in ("HTTPValidationError", "ValidationError"):  # only FastAPI's 422s, dropped below, used them
                schemas.pop(name, None)
            if api_key:
                doc["components"]["securitySchemes"] = {SECURITY_SCHEME: {
                    "type": "http", "scheme": "bearer", "description": "the server's --api-key"}}
            for path, operations in doc.get("paths", {}).items():
                for method, operation in operations.items():
                    _add_errors(operation, path, method, api_key)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def _add_model(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    """Put `model` and the models it refers to into the components, keeping those already there."""
    schema = model.model_json_schema(ref_template=REF + "{model}", mode="serialization")
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas.setdefault(model.__name__, schema)


def _add_errors(operation: dict[str, Any], path: str, method: str, api_key: bool) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    statuses = [400, 404, 500, 503]
    if method in ("post", "put", "patch"):
        statuses += [408, 413]
    if path == "/v1/models/unload":
        statuses.append(409)
    if path == "/v1/models/load":
        statuses.append(403)
    if api_key and path not in OPEN_PATHS:
        statuses.append(401)
        operation["security"] = [{SECURITY_SCHEME: []}]
    ref = {"application/json": {"schema": {"$ref": REF + "ErrorResponse"}}}
    for status in sorted(statuses):
        response = responses.setdefault(str(status), {"description": _WHY[status]})
        json_ = response.setdefault("content", {}).setdefault("application/json", {})
        if "schema" in json_:  # the route's own answer with this status (/health's 503) or an error
            json_["schema"] = {"anyOf": [json_["schema"], {"$ref": REF + "ErrorResponse"}]}
        else:
            response["content"].update(ref)
