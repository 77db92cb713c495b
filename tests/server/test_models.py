"""Several models in one server (the ModelManager behind the HTTP API), through the official openai client:
interleaved requests to two models, a memory budget that fits one, keep_alive, one load for many first
requests, unknown and broken models, the admin load/unload endpoints and per-model catalog options."""

from __future__ import annotations

import asyncio
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from safetensors import safe_open

from tests.server.conftest import offline
from tests.server.test_openai_api import metric
from tokenloom import SamplingParams

PROMPTS = ["Hello world", "The quick brown fox", "Paged attention keeps", "Numbers 0123", "café naïve"]


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def _models(server) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}


def _wait_for_state(server, name: str, state: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        card = _models(server)[name]
        if card["state"] == state:
            return card
        time.sleep(0.1)
    pytest.fail(f"{name} not {state} after {timeout}s: {card}")


@pytest.fixture(scope="module")
def references(tiny_models):
    """Greedy offline completions of PROMPTS per tiny model, with the servers' engine options."""
    from tokenloom.llm import LLM

    out = {}
    for name, arch in (("llama", "llama"), ("gemma", "gemma3")):
        llm = LLM(str(tiny_models[arch]), dtype="float32", kv_cache_gib=0.05, num_threads=1)
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        out[name] = [o.outputs[0].text for o in offline(llm, "generate", PROMPTS, params)]
        del llm
    return out


def test_interleaved_requests_to_two_models_equal_each_model_alone(multi_server, references):
    client = openai.AsyncOpenAI(base_url=f"{multi_server.url}/v1", api_key="x", max_retries=0)

    async def one(model: str, prompt: str, stream: bool) -> str:
        kwargs = dict(model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        if not stream:
            return (await client.completions.create(**kwargs)).choices[0].text
        return "".join([c.choices[0].text async for c in await client.completions.create(**kwargs, stream=True)])

    async def run() -> list[str]:
        jobs = [one(model, prompt, stream=i % 2 == 0) for i, prompt in enumerate(PROMPTS)
                for model in ("llama", "gemma")]
        return await asyncio.gather(*jobs)

    texts = asyncio.run(run())
    got = {"llama": texts[0::2], "gemma": texts[1::2]}
    assert got == references and references["llama"] != references["gemma"]
    states = _models(multi_server)
    assert states["llama"]["state"] == states["gemma"]["state"] == "loaded"


def test_budget_for_one_model_unloads_the_idle_one_and_accounts_its_bytes(budget_server, tiny_models):
    client = _client(budget_server)
    first = client.completions.create(model="first", prompt="Hello", max_tokens=4, temperature=0)
    cards = _models(budget_server)
    assert cards["first"]["state"] == "loaded" and cards["second"]["state"] == "available"
    second = client.completions.create(model="second", prompt="Hello", max_tokens=4, temperature=0)
    assert first.choices[0].text and second.choices[0].text
    cards = _models(budget_server)
    assert cards["first"]["state"] == "available" and cards["first"]["bytes_used"] == 0
    assert cards["second"]["state"] == "loaded"
    # The accounting, computed here from the checkpoint and the cache's shape: fp32 weights + K and V blocks.
    folder = tiny_models["gemma3"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        weights = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * 4  # noqa: SIM118 (not iterable)
    config = json.loads((folder / "config.json").read_text())
    blocks = metric(httpx.get(f"{budget_server.url}/metrics").text,
                    'tokenloom:kv_cache_num_blocks{model_name="second"}')
    kv = int(blocks) * 16 * config["num_key_value_heads"] * config["head_dim"] * 2 * config["num_hidden_layers"] * 4
    assert cards["second"]["bytes_used"] == weights + kv
    assert cards["second"]["bytes_used"] <= 0.075 * 2**30


def test_catalog_sampling_defaults_and_chat_template_apply(budget_server):
    client = _client(budget_server)
    out = client.completions.create(model="second", prompt="Hello", extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3  # the catalog's max_tokens, not OpenAI's 16
    r = httpx.post(f"{budget_server.url}/tokenize",
                   json={"model": "second", "messages": [{"role": "user", "content": "Hi"}]})
    r2 = httpx.post(f"{budget_server.url}/tokenize", json={"model": "second", "prompt": "<user>Hi"})
    assert r.status_code == 200 and r.json()["tokens"] == r2.json()["tokens"][-len(r.json()["tokens"]):]


def test_keep_alive_unloads_after_it_and_the_next_request_loads_again(multi_server):
    client = _client(multi_server)
    client.completions.create(model="mistral", prompt="Hello", max_tokens=2, extra_body={"keep_alive": "1s"})
    card = _models(multi_server)["mistral"]
    assert card["state"] == "loaded" and card["keep_alive"] == 1.0 and card["loads"] == 1
    _wait_for_state(multi_server, "mistral", "available", timeout=8.0)
    client.completions.create(model="mistral", prompt="Hello", max_tokens=2, extra_body={"keep_alive": -1})
    card = _models(multi_server)["mistral"]
    assert card["state"] == "loaded" and card["loads"] == 2 and card["keep_alive"] == -1.0


def test_ten_concurrent_first_requests_cause_one_load(multi_server):
    assert _models(multi_server)["qwen"]["state"] == "available"
    client = _client(multi_server)

    def ask(_: int) -> str:
        return client.completions.create(model="qwen", prompt="Hello", max_tokens=5, temperature=0).choices[0].text

    with ThreadPoolExecutor(10) as pool:
        texts = list(pool.map(ask, range(10)))
    assert len(set(texts)) == 1 and texts[0]
    assert _models(multi_server)["qwen"]["loads"] == 1
    assert metric(httpx.get(f"{multi_server.url}/metrics").text, 'tokenloom:model_loads_total{model_name="qwen"}') == 1


def test_unknown_model_is_404_naming_the_available_ones(multi_server):
    with pytest.raises(openai.NotFoundError) as err:
        _client(multi_server).completions.create(model="nope", prompt="Hello", max_tokens=2)
    assert "available models: bart, broken, classifier, gemma, llama, minilm, mistral, qwen" in err.value.message
    r = httpx.post(f"{multi_server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "name one in 'model'" in r.json()["error"]["message"]


def test_a_broken_model_fails_alone_while_others_keep_serving(multi_server, references):
    client = _client(multi_server)

    def good() -> str:
        return client.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(2) as pool:
        ok = pool.submit(good)
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="broken", prompt="Hello", max_tokens=2)
        assert ok.result() == references["llama"][0]
    assert err.value.status_code == 500 and "model 'broken' failed to load" in err.value.message
    assert "GGUF" in err.value.message
    card = _models(multi_server)["broken"]
    assert card["state"] == "failed" and "GGUF" in card["error"]
    assert good() == references["llama"][0]
    assert httpx.get(f"{multi_server.url}/health").status_code == 200


def test_admin_load_and_unload(multi_server, restricted_server):
    url = multi_server.url
    r = httpx.post(f"{url}/v1/models/load", json={"model": "gemma", "keep_alive": "10m"})
    assert r.status_code == 200 and r.json()["state"] == "loaded" and r.json()["keep_alive"] == 600.0
    assert r.json()["max_model_len"] == 512
    r = httpx.post(f"{url}/v1/models/unload", json={"model": "gemma"})
    assert r.status_code == 200 and r.json()["state"] == "available" and r.json()["bytes_used"] == 0
    assert httpx.post(f"{url}/v1/models/unload", json={"model": "nope"}).status_code == 404
    r = httpx.post(f"{url}/v1/models/load", json={"model": "gemma", "keep_alive": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"
    assert httpx.get(f"{url}/v1/models/gemma").json()["id"] == "gemma"
    # A model with a request in flight is not unloaded under it.
    body = {"model": "gemma", "prompt": "Hello", "max_tokens": 500, "n": 16, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as stream:
        lines = stream.iter_lines()  # kept: dropping the iterator closes the connection, aborting the request
        assert next(lines).startswith("data: ")
        r = httpx.post(f"{url}/v1/models/unload", json={"model": "gemma"})
        assert r.status_code == 409 and "1 requests in flight" in r.json()["error"]["message"]
    assert _wait_for_state(multi_server, "gemma", "loaded")["in_flight"] == 0
    # Admin actions sit behind the API key like every other non-open path.
    r = httpx.post(f"{restricted_server.url}/v1/models/unload", json={"model": "tiny"})
    assert r.status_code == 401


def test_an_encoder_decoder_model_serves_like_a_decoder(multi_server, tiny_seq2seq_models):
    from tokenloom.llm import LLM

    llm = LLM(str(tiny_seq2seq_models["bart"]), dtype="float32", kv_cache_gib=0.05, num_threads=1)
    prompts = ["Hello world", "The quick brown fox jumps"]
    params = SamplingParams(temperature=0, max_tokens=10, repetition_penalty=2.0)
    want = [o.outputs[0].text for o in offline(llm, "generate", prompts, params)]
    client = _client(multi_server)
    got = [client.completions.create(model="bart", prompt=p, max_tokens=10, temperature=0,
                                     extra_body={"repetition_penalty": 2.0}).choices[0].text for p in prompts]
    assert got == want
