"""The OpenAI API of a live tiny-model server, through the official `openai` client; greedy outputs equal
the offline `LLM.generate` / `LLM.chat` outputs."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import openai
import pytest

from tests.server.conftest import offline
from tokenloom import SamplingParams

PROMPTS = ["Hello world", "The quick brown fox jumps over", "Paged attention keeps keys"]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def test_completions_equal_offline_greedy_streaming_and_not(client, tiny_llm):
    expected = offline(tiny_llm, "generate", PROMPTS, greedy())
    for prompt, ref in zip(PROMPTS, expected):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        choice = out.choices[0]
        assert choice.text == ref.outputs[0].text and choice.finish_reason == ref.outputs[0].finish_reason
        assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == ref.outputs[0].text
        assert chunks[-1].choices[0].finish_reason == ref.outputs[0].finish_reason


def test_chat_equals_offline_greedy_streaming_and_not(client, tiny_llm):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                    {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "What is a fox?"}]
    ref = offline(tiny_llm, "chat", conversation, greedy(16))[0].outputs[0]
    out = client.chat.completions.create(model="tiny", messages=conversation, max_tokens=16, temperature=0)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=conversation, max_completion_tokens=16,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_32_concurrent_streaming_chats_each_equal_offline(tiny_server, tiny_llm):
    conversations = [[{"role": "user", "content": f"Question {i}: " + "fox " * (i % 7) + "why?"}] for i in range(32)]
    expected = [o.outputs[0].text for o in offline(tiny_llm, "chat", conversations, greedy(16))]

    async def one(client: openai.AsyncOpenAI, messages) -> str:
        stream = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                                      temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, m) for m in conversations))

    assert asyncio.run(run()) == expected


def test_token_id_prompts_and_prompt_lists(client, tiny_llm):
    ids = [tiny_llm.get_tokenizer().encode(p) for p in PROMPTS]
    expected = [o.outputs[0].text for o in offline(tiny_llm, "generate", PROMPTS, greedy(8))]
    out = client.completions.create(model="tiny", prompt=ids[0], max_tokens=8, temperature=0)
    assert out.choices[0].text == expected[0]
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected
    assert out.usage.prompt_tokens == sum(map(len, ids))
    out = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=8, temperature=0, n=2)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [t for t in expected for _ in (0, 1)]
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=8, temperature=0, stream=True))
    texts = [""] * len(PROMPTS)
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == expected


def test_n_choices_with_seed_streaming_and_not(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell a story"}], max_tokens=10, n=3,
              temperature=1.0, seed=7)
    out = client.chat.completions.create(**kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) > 1  # seeds differ per choice
    assert client.chat.completions.create(**kw).choices[1].message.content == texts[1]  # and repeat
    streamed = ["", "", ""]
    finished = set()
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert streamed == texts and finished == {0, 1, 2}


def test_completion_logprobs_and_echo(client, tiny_llm):
    ref = offline(tiny_llm, "generate", PROMPTS[1], greedy(6, logprobs=2))[0].outputs[0]
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ref.token_ids)
    for got, pos, token in zip(lp.token_logprobs, ref.logprobs, ref.token_ids):
        assert math.isclose(got, pos[token].logprob, abs_tol=1e-5)
    # Up to top-2 plus the chosen token (byte tokens that decode alike share a key, as in OpenAI's format).
    assert all(1 <= len(top) <= 3 and max(top.values()) >= got for top, got in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == out.choices[0].text

    echoed = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=1,
                                       echo=True)
    choice = echoed.choices[0]
    n_prompt = echoed.usage.prompt_tokens
    assert choice.text == PROMPTS[1] + ref.text
    assert len(choice.logprobs.tokens) == n_prompt + len(ref.token_ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.token_logprobs[1] is not None
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0, echo=True, stream=True))
    assert streamed == PROMPTS[1] + ref.text


def test_chat_logprobs_and_top_logprobs(client, tiny_llm):
    messages = [{"role": "user", "content": "Hello"}]
    ref = offline(tiny_llm, "chat", messages, greedy(5, logprobs=3))[0].outputs[0]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    for entry, pos, token in zip(content, ref.logprobs, ref.token_ids):
        assert math.isclose(entry.logprob, pos[token].logprob, abs_tol=1e-5)
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert math.isclose(tops[0], entry.logprob, abs_tol=1e-5)  # greedy picks the most likely token
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=1, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_stream_options_include_usage(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=7, temperature=0)
    usage = client.chat.completions.create(**kw).usage
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == usage
    assert all(c.usage is None for c in chunks[:-1])
    chunks = list(client.completions.create(model="tiny", prompt="Hi", max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7


def test_stop_strings_and_vllm_extras(client, tiny_llm):
    ref = offline(tiny_llm, "generate", PROMPTS[0], greedy(16))[0].outputs[0].text
    # Random weights differ per session; pick a stop string of whole characters from the reference text.
    stop = next(ref[i:i + 2] for i in range(2, len(ref) - 1) if "\ufffd" not in ref[i:i + 2])
    expected = offline(tiny_llm, "generate", PROMPTS[0], greedy(16, stop=[stop]))[0].outputs[0]
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == expected.finish_reason == "stop"
    assert out.choices[0].text == expected.text and stop not in out.choices[0].text
    extras = {"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.3, "ignore_eos": True, "min_tokens": 4}
    params = SamplingParams(temperature=0, max_tokens=9, top_k=5, min_p=0.01, repetition_penalty=1.3,
                            ignore_eos=True, min_tokens=4)
    ref = offline(tiny_llm, "generate", PROMPTS[2], params)[0].outputs[0]
    out = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=9, temperature=0, extra_body=extras)
    assert out.choices[0].text == ref.text and out.usage.completion_tokens == 9


def test_tokenize_detokenize_models_version_health(tiny_server, tiny_llm):
    tok = tiny_llm.get_tokenizer()
    r = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": "Hello world"})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode("Hello world")
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == 512
    messages = [{"role": "user", "content": "Hi"}]
    r = httpx.post(f"{tiny_server.url}/tokenize", json={"messages": messages})
    assert r.json()["tokens"] == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    r = httpx.post(f"{tiny_server.url}/detokenize", json={"tokens": tok.encode("Hello world", False)})
    assert r.status_code == 200 and r.json()["prompt"] == "Hello world"
    models = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="x").models.list()
    assert [m.id for m in models.data] == ["tiny"]
    version = httpx.get(f"{tiny_server.url}/version").json()
    assert version["version"] and version["isa_in_use"] in version["supported"] + ["torch"]
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {")


def test_metrics_expose_the_issue_metrics(tiny_server, client):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(f"{tiny_server.url}/metrics").text
    for name in ("tokenloom:num_requests_running", "tokenloom:num_requests_waiting", "tokenloom:kv_cache_usage_perc",
                 "tokenloom:prefix_cache_queries_total", "tokenloom:prefix_cache_hits_total",
                 "tokenloom:prompt_tokens_total", "tokenloom:generation_tokens_total",
                 "tokenloom:time_to_first_token_seconds_count", "tokenloom:inter_token_latency_seconds_count",
                 "tokenloom:e2e_request_latency_seconds_count"):
        assert name in text
    assert metric(text, "tokenloom:generation_tokens_total") >= 3
    assert metric(text, "tokenloom:e2e_request_latency_seconds_count") >= 1


def test_disconnecting_stream_aborts_and_frees_blocks(tiny_server):
    url = tiny_server.url
    before = httpx.get(f"{url}/metrics").text
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data:"))
        assert json.loads(first[5:])["choices"][0]["index"] == 0
    # The client is gone after one chunk, long before 480 tokens: the request must be aborted, its blocks free.
    for _ in range(100):
        text = httpx.get(f"{url}/metrics").text
        if metric(text, "tokenloom:num_requests_running") == 0 and metric(text, "tokenloom:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.05)
    assert metric(text, "tokenloom:num_requests_running") == 0
    assert metric(text, "tokenloom:kv_cache_usage_perc") == 0
    aborted = 'tokenloom:request_success_total{finished_reason="abort",model_name="tiny"}'
    assert metric(text, aborted) == metric(before, aborted) + 1
    generated = metric(text, "tokenloom:generation_tokens_total") - metric(before, "tokenloom:generation_tokens_total")
    assert 0 < generated < 480


def test_disconnecting_non_streaming_client_aborts_its_request(tiny_server):
    url = tiny_server.url
    aborted = 'tokenloom:request_success_total{finished_reason="abort",model_name="tiny"}'
    before = metric(httpx.get(f"{url}/metrics").text, aborted)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.05))
    for _ in range(100):
        text = httpx.get(f"{url}/metrics").text
        if metric(text, aborted) > before and metric(text, "tokenloom:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.05)
    assert metric(text, aborted) == before + 1 and metric(text, "tokenloom:num_requests_running") == 0


def test_logits_processors_by_name_in_the_request(tiny_server, client, tiny_llm):
    body = {"ignore_eos": True, "logits_processors": [{"name": "no_repeat_ngram", "args": {"size": 1}}]}
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, extra_body=body)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            logits_processors=[{"name": "no_repeat_ngram", "args": {"size": 1}}])
    want = offline(tiny_llm, "generate", ["Hello"], params)[0].outputs[0]
    assert out.choices[0].text == want.text and len(set(want.token_ids)) == len(want.token_ids)
    r = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", "prompt": "Hi",
                                                              "logits_processors": ["nope"]})
    assert r.status_code == 400 and "unknown processor 'nope'" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "logits_processors"
