"""POST /v1/embeddings (OpenAI's shape, float or base64) and POST /classify, on encoder-only models.

Inputs are tokenized and checked off the event loop, every one before any runs (an over-long input is a
400 naming its index unless `truncate` is set); then they go to the model's pooling engine together,
where they share token-budget batches with other requests' inputs.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from tokenloom.adapters import AdapterRequest
from tokenloom.engine import pooling_outputs
from tokenloom.engine.pooling import EncoderInput, PoolingResult
from tokenloom.server.errors import APIError
from tokenloom.server.model_leases import ServedModel
from tokenloom.server.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    random_id,
)
from tokenloom.server.request_handling import state_of

router = APIRouter()


@router.post("/v1/embeddings", response_model=None, responses={200: {"model": EmbeddingResponse}})
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    """Sentence embeddings of a text, a list of texts, or token id lists (through an adapter when `model`
    names one)."""
    items = _items(body.input)
    async with state_of(request).use_model(body) as lease:
        served = lease.model
        served.pooler("embed")
        width = served.hf_config.hidden_size  # every pooling mode keeps the hidden size
        if body.dimensions is not None and body.dimensions != width:  # refused before any work is done
            raise APIError(400, f"model '{served.name}' does not support 'dimensions': its embeddings have {width} "
                                f"dimensions and cannot be shortened", param="dimensions", code="unsupported_parameter")
        inputs = await _tokenize(served, items, body.truncate)
        results = await _run(served, inputs, "embed", lease.adapter)  # a LoRA, soft prompt or prefix, if named
        data = [{"object": "embedding", "index": i, "embedding": _encode(r.data, body.encoding_format)}
                for i, r in enumerate(results)]
        tokens = sum(len(inp.token_ids) for inp in inputs)
        return {"object": "list", "data": data, "model": lease.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@router.post("/classify", response_model=None, responses={200: {"model": ClassifyResponse}})
async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
    """Label probabilities of a text or several, with the model's labels (`id2label`)."""
    items = [body.input] if isinstance(body.input, str) else list(body.input)
    if not items:
        raise APIError(400, "input must not be empty", param="input", code="invalid_value")
    async with state_of(request).use_model(body) as lease:
        served, adapter = lease.model, lease.adapter
        if adapter is None:  # an adapter brings its own head (a bare encoder has none)
            served.pooler("classify")
        inputs = await _tokenize(served, items, body.truncate)
        results = await _run(served, inputs, "classify", adapter)
        config = served.hf_config
        if adapter is not None:
            config = await asyncio.wrap_future(served.engine.call(lambda engine: engine.label_config(adapter)))
        data = []
        for i, (inp, r) in enumerate(zip(inputs, results)):
            out = pooling_outputs.classification(r.data, config, inp)
            data.append({"index": i, "label": out.label, "probs": out.probs, "labels": out.labels,
                         "num_classes": len(out.labels)})
        tokens = sum(len(inp.token_ids) for inp in inputs)
        return {"id": random_id("classify"), "object": "list", "created": int(time.time()), "model": lease.name,
                "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _items(raw: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        return [raw]
    if not raw:
        raise APIError(400, "input must not be empty", param="input", code="invalid_value")
    return list(raw)


async def _tokenize(served: ServedModel, items: list[str | list[int]], truncate: bool) -> list[EncoderInput]:
    """Every input tokenized and checked, off the event loop; the first bad one is a 400 naming its index."""
    engine = served.inner

    def tokenize_all() -> list[EncoderInput]:
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str) and not item:
                raise APIError(400, f"input[{i}] is an empty string", param="input", code="invalid_value")
            try:
                if served.kind == "decoder":  # a decoder's head (an adapter's) reads the prompt's last token
                    out.append(EncoderInput(engine.inputs.token_ids(item)))
                else:
                    out.append(engine.tokenize(item, truncate=truncate) if isinstance(item, str)
                               else engine.from_token_ids(list(item), truncate))
            except ValueError as exc:
                raise APIError(400, f"input[{i}]: {exc}", param="input", code="invalid_value") from exc
        return out

    return await asyncio.get_running_loop().run_in_executor(None, tokenize_all)


async def _run(served: ServedModel, inputs: list[EncoderInput], task: str,
               adapter: AdapterRequest | None = None) -> list[PoolingResult]:
    try:
        results = await served.engine.encode(inputs, task, adapter=adapter)
    except ValueError as exc:  # the adapter cannot be loaded or has no head for the task
        raise APIError(400, str(exc), param="model", code="invalid_value") from exc
    failed = [f"input[{i}]: {r.error}" for i, r in enumerate(results) if r.error]
    if failed:
        raise APIError(500, f"{task} failed for {len(failed)} of {len(results)} inputs: {'; '.join(failed[:3])}",
                       code="inference_error")
    return results


def _encode(vector: Any, encoding_format: str) -> list[float] | str:
    values = np.asarray(vector.float().cpu().numpy(), dtype="<f4")
    if encoding_format == "base64":  # what OpenAI's clients decode: little-endian float32 bytes
        return base64.b64encode(values.tobytes()).decode("ascii")
    return values.tolist()
