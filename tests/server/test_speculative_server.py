"""A server with speculative decoding (prompt lookup), through the `openai` client: greedy outputs equal the
offline engine's without speculation, streamed and not, and /metrics counts guesses and acceptances."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import offline
from tests.server.test_openai_api import metric
from tokenloom import SamplingParams

PROMPTS = ["The quick brown fox jumps over the lazy dog. The quick brown fox jumps over",
           "Hello world! Hello world! Hello", "Paged attention keeps keys and values in fixed-size blocks"]


@pytest.fixture(scope="module")
def client(speculative_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{speculative_server.url}/v1", api_key="unused", max_retries=0)


def test_completions_and_chat_equal_decoding_without_speculation(client, tiny_llm, speculative_server):
    before = httpx.get(f"{speculative_server.url}/metrics").text
    expected = offline(tiny_llm, "generate", PROMPTS, SamplingParams(temperature=0, max_tokens=40, logprobs=1))
    for prompt, ref in zip(PROMPTS, expected):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, logprobs=1)
        choice = out.choices[0]
        assert choice.text == ref.outputs[0].text and choice.finish_reason == ref.outputs[0].finish_reason
        assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)
        ref_lps = [lp[t].logprob for lp, t in zip(ref.outputs[0].logprobs, ref.outputs[0].token_ids)]
        assert choice.logprobs.token_logprobs == pytest.approx(ref_lps, abs=1e-4)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.outputs[0].text
    messages = [{"role": "user", "content": PROMPTS[1]}]
    ref = offline(tiny_llm, "chat", [messages], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    assert chat.choices[0].message.content == ref.text
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ref.text
    after = httpx.get(f"{speculative_server.url}/metrics").text
    drafts = metric(after, "tokenloom:spec_decode_num_drafts_total") - \
        metric(before, "tokenloom:spec_decode_num_drafts_total")
    accepted = metric(after, "tokenloom:spec_decode_num_accepted_tokens_total") - \
        metric(before, "tokenloom:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and accepted > 0
    assert 'method="ngram"' in after
    assert metric(after, "tokenloom:kv_cache_usage_perc") == 0.0
