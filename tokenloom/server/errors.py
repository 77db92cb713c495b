"""Errors in OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`.

Every failure ends here: validation errors become 400s naming the parameter, engine-side
`ValueError`s become 400s, a full queue a 503, anything unexpected a 500 whose body says only that
(the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenloom.engine.async_engine import EngineDeadError, RequestAbortedError, ServerBusyError
from tokenloom.manager import MemoryBudgetError, ModelLoadError
from tokenloom.sampling_params import SamplingParamsError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a full queue frees slots within a step or a few; the clients' own backoff then grows

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error to send to the client with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response (also sent as a server-sent event inside a stream); absolute file
    paths in the message are cut to their last part (a client learns nothing of the server's folders)."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": hide_paths(message), "type": kind, "param": param, "code": code}}


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~])(?:/[\w.@+~-]+){2,}/?")


def hide_paths(message: str) -> str:
    """`message` with every absolute file path written as its last part ("/srv/models/m.gguf" → "m.gguf"); a
    path is one whose first folder exists here (a route such as /v1/models is not)."""
    def last_part(match: re.Match[str]) -> str:
        path = match.group(0)
        if not os.path.isdir("/" + path.split("/")[1]):
            return path
        return path.rstrip("/").rsplit("/", 1)[-1]

    return _ABSOLUTE_PATH.sub(last_part, message)


def error_response(error: APIError) -> JSONResponse:
    """A JSON response for an APIError."""
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the error the client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ServerBusyError):  # OpenAI's clients wait Retry-After seconds, then retry
        return APIError(503, str(exc), code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, MemoryBudgetError):
        return APIError(503, f"not enough memory for this model now: {exc}", param="model", code="insufficient_memory")
    if isinstance(exc, ModelLoadError):
        return APIError(500, str(exc), param="model", code="model_load_failed")
    if isinstance(exc, (EngineDeadError, RequestAbortedError)):
        return APIError(503, str(exc), code="service_unavailable")
    if isinstance(exc, SamplingParamsError):
        return APIError(400, str(exc), param=str(exc).split(" ", 1)[0].rstrip(":"), code="invalid_value")
    if isinstance(exc, jinja2.TemplateError):
        return APIError(400, f"the chat template failed on these messages: {exc}", param="messages",
                        code="invalid_value")
    if isinstance(exc, ValueError):
        message = str(exc)
        return APIError(400, message, param="prompt" if message.startswith("prompt") else None, code="invalid_value")
    logger.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "internal server error; the server log has the details", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception an endpoint can raise to an OpenAI-shaped response."""

    async def known(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    async def http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own 400 is a body its JSON parser gave up on: not UTF-8, or nested past Python's stack.
        message = {400: "the request body could not be parsed as JSON: it is not UTF-8, or nested too deep",
                   404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code)
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "request_too_large"}.get(exc.status_code)
        error = APIError(exc.status_code, message or str(exc.detail), code=code, headers=exc.headers)
        return error_response(error)  # a 405 keeps its Allow header

    for kind in (APIError, ValueError, ServerBusyError, EngineDeadError, RequestAbortedError, jinja2.TemplateError,
                 ModelLoadError, Exception):
        app.add_exception_handler(kind, known)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)


def validation_error(errors: list[dict[str, Any]] | Any) -> APIError:
    """A 400 naming the first invalid parameter of a request body."""
    errors = list(errors)
    first = errors[0] if errors else {"type": "missing", "loc": ("body",), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first["msg"])
        return APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    loc = [p for p in first["loc"] if p != "body"]
    if first["type"] in ("lone_surrogate", "too_deep"):  # a model-level check: the path inside it is in ctx
        inner = first["ctx"]["path"]
        outer = _path([p for p in loc if not _is_tag(p)])
        param = (outer + ("" if inner.startswith("[") or not outer else ".") + inner) if outer else inner
        return APIError(400, f"invalid value for '{param}': {first['msg']}", param=param or None,
                        code="invalid_value")
    if not loc:
        if first["type"] == "missing":
            return APIError(400, "the request needs a JSON object body", code="invalid_json")
        return APIError(400, f"the request body must be a JSON object: {first['msg']}", code="invalid_json")
    field = str(loc[0])
    tags = [str(e["loc"][2]) for e in errors if len(e["loc"]) > 2 and e["loc"][1] == field and _is_tag(e["loc"][2])]
    if tags and _is_tag(loc[1] if len(loc) > 1 else ""):
        expected = " or ".join(dict.fromkeys(t.replace("constrained-", "non-empty ") for t in tags))
        return APIError(400, f"invalid value for '{field}': expected {expected}; got {_short(first.get('input'))}",
                        param=field, code="invalid_type")
    param = _path([p for p in loc if not _is_tag(p)])
    if first["type"] == "missing":
        return APIError(400, f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: '{param}'", param=param,
                        code="unknown_parameter")
    return APIError(400, f"invalid value for '{param}': {first['msg']}; got {_short(first.get('input'))}",
                    param=param, code="invalid_value")


def _is_tag(part: object) -> bool:
    """Union members and model names show up in pydantic's error locations; they are not parameters."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool") or part[:1].isupper()
                                      or part.startswith(("constrained-", "function-")))


def _path(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
