"""The small endpoints: /v1/models, /tokenize, /detokenize, /health, /version, /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import tokenloom
from tokenloom.server.errors import APIError
from tokenloom.server.protocol import DetokenizeRequest, TokenizeRequest
from tokenloom.server.serving import state_of

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The one served model."""
    state = state_of(request)
    return {"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": state.created, "owned_by": "tokenloom",
        "root": state.engine.engine.config.model_config.model, "max_model_len": state.engine.max_model_len}]}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """Token ids of a prompt, or of messages rendered through the chat template."""
    state = state_of(request)
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt", code="invalid_value")
    if body.messages is not None:
        messages = [m.as_template_input() for m in body.messages]
        tokens = await state.tokenizer.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)
    else:
        tokens = await state.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
    return {"count": len(tokens), "max_model_len": state.engine.max_model_len, "tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    """Text of token ids."""
    state = state_of(request)
    state.check_model(body.model)
    vocab = state.engine.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens must be in [0, {vocab}); got {bad[:5]}", param="tokens", code="invalid_value")
    return {"prompt": await state.tokenizer.decode(body.tokens, skip_special_tokens=False)}


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine runs; 503 once it stopped or while the server drains."""
    engine = state_of(request).engine
    if not engine.is_alive:
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    if engine.is_draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def version() -> dict[str, str]:
    """The tokenloom version."""
    return {"version": tokenloom.__version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics in the text format."""
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
