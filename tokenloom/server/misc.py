"""The small endpoints: /tokenize, /detokenize, /health, /version, /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import tokenloom
from tokenloom.server.errors import APIError
from tokenloom.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from tokenloom.server.request_handling import state_of

router = APIRouter()


@router.post("/tokenize", response_model=None, responses={200: {"model": TokenizeResponse}})
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """Token ids of a prompt, or of messages rendered through the chat template."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt", code="invalid_value")
    async with state_of(request).use_model(body) as lease:
        tokenizer = lease.model.tokenizer
        if body.messages is not None:
            messages = [m.as_template_input() for m in body.messages]
            tokens = await tokenizer.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)
        else:
            tokens = await tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": lease.model.max_model_len, "tokens": tokens}


@router.post("/detokenize", response_model=None, responses={200: {"model": DetokenizeResponse}})
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    """Text of token ids."""
    async with state_of(request).use_model(body) as lease:
        vocab = lease.model.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must be in [0, {vocab}); got {bad[:5]}", param="tokens",
                           code="invalid_value")
        return {"prompt": await lease.model.tokenizer.decode(body.tokens, skip_special_tokens=False)}


@router.get("/health", response_model=None, responses={
    200: {"model": HealthResponse}, 503: {"model": HealthResponse, "description": "Draining, or an engine stopped"}})
async def health(request: Request) -> Response:
    """200 while every loaded model's engine runs; 503 once one stopped or while the server drains."""
    state = state_of(request)
    if state.models.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    stopped = [name for name, served in state.manager.loaded().items() if not served.is_alive]
    if stopped:
        return JSONResponse({"status": f"engine stopped: {', '.join(stopped)}"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/version", response_model=None, responses={200: {"model": VersionResponse}})
async def version() -> dict[str, object]:
    """The tokenloom version, and the CPU's instruction-set level with the level the kernels run at."""
    from tokenloom.models import ops

    return {"version": tokenloom.__version__, **ops.describe()}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Prometheus metrics in the text format."""
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
