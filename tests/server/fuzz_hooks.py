"""Schemathesis extensions shared by tests/server/test_fuzz.py and scripts/fuzz.sh (which loads this module through
SCHEMATHESIS_HOOKS): the `openai_error_shape` check; hooks that point most generated requests at the served model,
so they get past the 404 for an unknown model into the code behind it; and one that pins the model again after a
request changed its keep_alive or unloaded it (a keep_alive of 0 sticks, and every later request would reload it)."""

from __future__ import annotations

import json
import os
from typing import Any

import requests
import schemathesis
from hypothesis import strategies as st

# The name the fuzzed server serves its model under (tests/server/conftest.py serves "tiny").
MODEL = os.environ.get("TOKENLOOM_FUZZ_MODEL", "tiny")
ERROR_FIELDS = {"message", "type", "param", "code"}


@schemathesis.check
def openai_error_shape(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                       case: schemathesis.Case) -> bool | None:
    """Every error response (status >= 400) is JSON in OpenAI's shape, `{"error": {"message", "type", "param",
    "code"}}`, with a non-empty message and type, and no traceback."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    if not content_type.startswith("application/json"):
        raise AssertionError(f"a {response.status_code} is {content_type or 'untyped'}, not application/json")
    try:
        body = json.loads(response.content)
    except ValueError as exc:
        raise AssertionError(f"a {response.status_code} body is not JSON: {exc}") from None
    problem = error_shape_problem(body)
    if problem is not None:
        raise AssertionError(f"a {response.status_code} is not in OpenAI's error shape: {problem}")
    if "Traceback" in response.content.decode("utf-8", "replace"):
        raise AssertionError(f"a {response.status_code} carries a traceback")
    return True


def error_shape_problem(body: Any) -> str | None:
    """What keeps `body` from being OpenAI's error shape, or None when it is."""
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"expected an object with only 'error'; got {json.dumps(body)[:200]}"
    error = body["error"]
    if set(error) != ERROR_FIELDS:
        return f"error fields {sorted(error)} are not {sorted(ERROR_FIELDS)}"
    for name in ("message", "type"):
        if not isinstance(error[name], str) or not error[name]:
            return f"error.{name} must be a non-empty string; got {error[name]!r}"
    for name in ("param", "code"):
        if error[name] is not None and not isinstance(error[name], str):
            return f"error.{name} must be a string or null; got {error[name]!r}"
    return None


@schemathesis.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy:
    """Three in four bodies that name a model as a string name the served one; the rest keep the generated name
    (a 404) and so do bodies whose `model` is of a wrong type (a 400)."""
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return st.sampled_from([MODEL, MODEL, MODEL, body["model"]]).map(lambda model: {**body, "model": model})
    return st.just(body)


@schemathesis.hook
def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: Any) -> st.SearchStrategy:
    """GET /v1/models/{model}: half the generated names are replaced by the served model's."""
    if isinstance(path_parameters, dict) and isinstance(path_parameters.get("model"), str):
        return st.sampled_from([MODEL, path_parameters["model"]]).map(
            lambda model: {**path_parameters, "model": model})
    return st.just(path_parameters)


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: schemathesis.Response) -> None:
    """After a request that may have set the model's keep_alive or unloaded it, load it again, kept loaded."""
    body = case.body if isinstance(case.body, dict) else {}
    if response.status_code == 401 or body.get("keep_alive") is None and case.operation.path != "/v1/models/unload":
        return
    url = response.request.url or ""
    base = url[: url.index(case.operation.path)]
    auth = response.request.headers.get("Authorization")
    reply = requests.post(f"{base}/v1/models/load", json={"model": MODEL, "keep_alive": -1}, timeout=60,
                          headers={"Authorization": auth} if auth else {})
    if reply.status_code != 200:
        raise AssertionError(f"could not load {MODEL} again after {case.operation.label}: {reply.text[:300]}")
