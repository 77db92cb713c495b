"""The OpenAPI document, made true to what the server answers: FastAPI lists only 200 and 422, while every
error here is OpenAI's JSON shape with 400 (never 422), 401 (behind an API key), 404, 408, 413, 500 or 503."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from tokenloom.server.middleware import OPEN_PATHS

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_WHY = {400: "Invalid request: the message names the parameter", 401: "Missing or wrong API key",
        403: "Not allowed on this server (an adapter path outside --adapter-dir)",
        404: "Unknown model or route", 408: "The request body did not arrive in time",
        409: "The model is busy", 413: "Request body too large", 500: "Server error (details in the server log)",
        503: "Busy (retry after Retry-After seconds), shutting down, or out of memory for the model"}


def install_openapi(app: FastAPI, api_key: bool) -> None:
    """Replace `app.openapi` with a document that lists each operation's error responses."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = ERROR_SCHEMA
            for path, operations in doc.get("paths", {}).items():
                for method, operation in operations.items():
                    _add_errors(operation, path, method, api_key)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def _add_errors(operation: dict[str, Any], path: str, method: str, api_key: bool) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    statuses = [400, 404, 500, 503]
    if method in ("post", "put", "patch"):
        statuses += [408, 413]
    if path.startswith("/v1/models/"):
        statuses.append(409)
    if path == "/v1/models/load":
        statuses.append(403)
    if api_key and path not in OPEN_PATHS:
        statuses.append(401)
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for status in sorted(statuses):
        responses.setdefault(str(status), {"description": _WHY[status], "content": ref})
