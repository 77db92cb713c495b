"""The real default model, gemma-3-270m, served: greedy outputs equal the offline LLM's."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import offline
from tokenloom import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name three primary colors."}]


@pytest.fixture(scope="module")
def client(gemma_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gemma_server.url}/v1", api_key="unused", max_retries=0)


def test_gemma_completions_equal_offline(client, gemma_llm):
    # The server runs these requests one at a time, so the reference runs each prompt alone too: bf16 decode
    # steps are not batch-invariant (a one-row and a two-row step differ by an ulp in a layer's output, which
    # can move a near-tie later on); fp32 is, as tests/models/test_gemma_gguf.py checks.
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = [offline(gemma_llm, "generate", [prompt], params)[0] for prompt in PROMPTS]
    model = client.models.list().data[0].id
    assert model == "gemma-3-270m"
    for prompt, ref in zip(PROMPTS, expected):
        text = ref.outputs[0].text
        assert text.strip()
        out = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        assert out.choices[0].text == text
        streamed = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == text


def test_gemma_chat_equals_offline(client, gemma_llm):
    ref = offline(gemma_llm, "chat", CONVERSATION, SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    out = client.chat.completions.create(model="gemma-3-270m", messages=CONVERSATION, max_tokens=24, temperature=0)
    assert out.choices[0].message.content == ref.text and out.choices[0].finish_reason == ref.finish_reason
    chunks = client.chat.completions.create(model="gemma-3-270m", messages=CONVERSATION, max_tokens=24,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
