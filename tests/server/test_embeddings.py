"""/v1/embeddings and /classify on encoder-only models through the official openai client, equal to the
offline API; requests of the wrong kind get a 400 saying what the model supports."""

from __future__ import annotations

import httpx
import openai
import pytest

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.",
             "Un café, s'il vous plaît. 🙂", "x"]


@pytest.fixture(scope="module")
def client(multi_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{multi_server.url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def minilm():
    from tokenloom.llm import LLM

    return LLM("all-minilm-l6-v2", dtype="float32", num_threads=1)


def test_embeddings_equal_the_offline_api(client, minilm):
    want = [o.embedding for o in minilm.embed(SENTENCES)]
    default = client.embeddings.create(model="minilm", input=SENTENCES)  # the client asks for base64
    plain = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    for response in (default, plain):
        assert [d.index for d in response.data] == list(range(len(SENTENCES)))
        for got, ref in zip(response.data, want):
            assert got.embedding == pytest.approx(ref, abs=1e-5)
    tokens = sum(o.num_prompt_tokens for o in minilm.embed(SENTENCES))
    assert plain.usage.prompt_tokens == plain.usage.total_tokens == tokens
    single = client.embeddings.create(model="minilm", input=SENTENCES[0], encoding_format="float")
    assert single.data[0].embedding == pytest.approx(want[0], abs=1e-5)
    ids = minilm.get_tokenizer().encode(SENTENCES[2])
    by_ids = client.embeddings.create(model="minilm", input=[ids], encoding_format="float")
    assert by_ids.data[0].embedding == pytest.approx(want[2], abs=1e-5)


def test_embedding_limits_and_options(client, multi_server):
    long = "word " * 400
    with pytest.raises(openai.BadRequestError, match=r"input\[1\]: .*256"):
        client.embeddings.create(model="minilm", input=["short", long])
    r = httpx.post(f"{multi_server.url}/v1/embeddings", json={"model": "minilm", "input": long, "truncate": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256
    with pytest.raises(openai.BadRequestError, match="its embeddings have 384 dimensions"):
        client.embeddings.create(model="minilm", input="hi", dimensions=64)
    assert len(client.embeddings.create(model="minilm", input="hi", dimensions=384,
                                        encoding_format="float").data[0].embedding) == 384


def test_classify_equals_the_offline_api(multi_server, tmp_path_factory):
    from tests.encoder_models import tiny_encoder_path
    from tokenloom.llm import LLM

    path = tiny_encoder_path(tmp_path_factory, "bert-ForSequenceClassification")  # the server's "classifier"
    want = LLM(str(path), dtype="float32", num_threads=1).classify(SENTENCES)
    r = httpx.post(f"{multi_server.url}/classify", json={"model": "classifier", "input": SENTENCES})
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["label"] for d in data] == [o.label for o in want]
    for d, o in zip(data, want):
        assert d["probs"] == pytest.approx(o.probs, abs=1e-5) and d["labels"] == o.labels == ["L0", "L1", "L2"]


def test_requests_of_the_wrong_kind_say_what_the_model_supports(client, multi_server):
    with pytest.raises(openai.BadRequestError, match="encoder-only model: it supports embed.*not text generation"):
        client.completions.create(model="minilm", prompt="Hello", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="encoder-only model"):
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="'llama' is a generative model: it supports generate, chat"):
        client.embeddings.create(model="llama", input="Hello")
    r = httpx.post(f"{multi_server.url}/classify", json={"model": "minilm", "input": "Hello"})
    assert r.status_code == 400 and "not classify" in r.json()["error"]["message"]
