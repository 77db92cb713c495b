"""Adapters over HTTP: `tokenloom serve MODEL --adapters a1=PATH,a2=PATH` (a LoRA and a prefix) lists each
adapter as a model of its own (its parent the base, its kind the method) and runs a request under the adapter
its `model` names, through the real `openai` client, streamed and not, next to base-model requests."""

from __future__ import annotations

import httpx
import openai

from tokenloom import AdapterRequest, SamplingParams
from tokenloom.llm import LLM


def test_adapters_are_models_of_their_own_with_the_offline_outputs(adapters_server, server_adapters, tiny_models):
    client = openai.OpenAI(base_url=f"{adapters_server.url}/v1", api_key="x", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "a1", "a2"}
    assert cards["a1"].model_extra["parent"] == "base" and cards["a1"].model_extra["root"] == "a1"
    assert cards["a1"].model_extra["kind"] == "lora" and cards["a2"].model_extra["kind"] == "prefix-tuning"
    prompt = [5, 17, 42, 99, 7, 3, 25]
    offline = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for name in ("a1", "a2", "base"):
        adapter = AdapterRequest(name, server_adapters[name]) if name != "base" else None
        want = offline.generate([prompt], params, use_tqdm=False, adapter=adapter)[0].outputs[0].text
        got = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.model == name and got.choices[0].text == want, name
        streamed = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in streamed) == want, name
    assert httpx.get(f"{adapters_server.url}/v1/models/a2").json()["parent"] == "base"


def test_an_unknown_model_lists_the_adapters(adapters_server):
    r = httpx.post(f"{adapters_server.url}/v1/completions", json={"model": "a3", "prompt": "hi"})
    assert r.status_code == 404 and "a1" in r.json()["error"]["message"]


def test_malformed_adapter_options_name_the_entry():
    import pytest

    from tokenloom.server.config import ServerConfig, ServerConfigError

    with pytest.raises(ServerConfigError, match="each entry must be NAME=PATH; got 'a1'"):
        ServerConfig(adapters="a1")
    with pytest.raises(ServerConfigError, match="'a1' is named twice"):
        ServerConfig(adapters="a1=/x,a1=/y")
    assert ServerConfig(adapters="a1=/x, a2=/y").adapter_paths == {"a1": "/x", "a2": "/y"}


def test_adapters_load_and_unload_through_the_admin_routes(adapters_server, server_adapters):
    url = adapters_server.url
    body = {"model": "late", "prompt": [5, 17, 42, 99], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 404
    r = httpx.post(f"{url}/v1/models/load", json={"model": "late", "adapter_path": str(server_adapters["a2"])})
    assert r.status_code == 200 and r.json()["parent"] == "base" and r.json()["kind"] == "prefix-tuning"
    late = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"]
    assert late == httpx.post(f"{url}/v1/completions", json={**body, "model": "a2"}).json()["choices"][0]["text"]
    assert httpx.post(f"{url}/v1/models/unload", json={"model": "late"}).json()["state"] == "unloaded"
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 404
    bad = httpx.post(f"{url}/v1/models/load", json={"model": "broken", "adapter_path": "nowhere"})
    assert bad.status_code == 400 and "adapter_config.json does not exist" in bad.json()["error"]["message"]
    assert "server-adapters" not in bad.text  # the server's folders stay its own
    relative = httpx.post(f"{url}/v1/models/load", json={"model": "rel", "adapter_path": "a2"})
    assert relative.status_code == 200 and relative.json()["root"] == "a2"
    assert httpx.post(f"{url}/v1/models/unload", json={"model": "rel"}).status_code == 200
    for outside in ("/etc", "../../etc", f"{server_adapters['a1']}/../..", "http://example.com/lora"):
        r = httpx.post(f"{url}/v1/models/load", json={"model": "evil", "adapter_path": outside})
        assert r.status_code == 403 and r.json()["error"]["param"] == "adapter_path", (outside, r.text)
    assert {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]} == {"base", "a1", "a2"}


def test_adapter_routes_on_a_server_without_adapters(tiny_server):
    r = httpx.post(f"{tiny_server.url}/v1/models/load", json={"model": "x", "adapter_path": "/nowhere"})
    assert r.status_code == 400 and "adapters are off" in r.json()["error"]["message"]


def test_a_trained_head_classifies_over_http(tmp_path_factory):
    """An encoder served with a classification-head adapter and a soft prompt: POST /classify with the head's
    name gives the offline `llm.classify(adapter=...)` labels and probabilities (the bare encoder itself
    refuses), /v1/embeddings with the soft prompt's name the offline `llm.embed(adapter=...)` vectors."""
    from openai import OpenAI

    from tests.adapters.test_encoder_prompts import _peft
    from tests.adapters.test_heads import _save_peft_head
    from tests.encoder_models import tiny_encoder_path
    from tests.server.conftest import MODEL_FLAGS, launch

    bert = tiny_encoder_path(tmp_path_factory, "bert-Model")
    root = tmp_path_factory.mktemp("head-server")
    _save_peft_head(bert, root / "head", 3, seed=4)
    _peft(bert, "prompt-tuning", "FEATURE_EXTRACTION", seed=5).save_pretrained(root / "soft")
    server = launch(str(bert), [*MODEL_FLAGS, "--served-model-name", "enc", "--adapters",
                                f"head={root / 'head'},soft={root / 'soft'}"], root, "head").wait_ready()
    try:
        texts = ["A man is eating food.", "A monkey is playing drums."]
        r = httpx.post(f"{server.url}/classify", json={"model": "head", "input": texts})
        assert r.status_code == 200, r.text
        offline = LLM(str(bert), dtype="float32", enable_adapters=True).classify(
            texts, adapter=AdapterRequest("head", root / "head"))
        body = r.json()
        assert body["model"] == "head" and [d["label"] for d in body["data"]] == [o.label for o in offline]
        assert all(abs(a - b) < 1e-5 for d, o in zip(body["data"], offline) for a, b in zip(d["probs"], o.probs))
        assert body["data"][0]["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
        bare = httpx.post(f"{server.url}/classify", json={"model": "enc", "input": texts})
        assert bare.status_code == 400 and "classify" in bare.json()["error"]["message"]
        client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
        soft = client.embeddings.create(model="soft", input=texts)
        llm = LLM(str(bert), dtype="float32", enable_adapters=True)
        want = llm.embed(texts, adapter=AdapterRequest("soft", root / "soft"))
        assert soft.model == "soft" and soft.usage.prompt_tokens == sum(o.num_prompt_tokens for o in want)
        for d, o in zip(soft.data, want):
            assert max(abs(a - b) for a, b in zip(d.embedding, o.embedding)) < 1e-5
        base = client.embeddings.create(model="enc", input=texts).data[0].embedding
        assert max(abs(a - b) for a, b in zip(base, want[0].embedding)) > 1e-3
    finally:
        server.stop()



def test_a_decoder_head_classifies_over_http(tiny_models, tmp_path_factory):
    """A decoder served with a head adapter trained here: POST /classify with its name gives the offline
    labels and probabilities."""
    from tests.adapters.test_heads import _data
    from tests.server.conftest import MODEL_FLAGS, launch
    from tokenloom.adapters.train import train

    root = tmp_path_factory.mktemp("decoder-head")
    train(model=str(tiny_models["llama"]), data=str(_data(root / "train.txt")), method="head", task="classification",
          labels="negative,positive", output=str(root / "head"), epochs=2, lr=3e-3, batch_size=4, rank=4)
    server = launch(str(tiny_models["llama"]), [*MODEL_FLAGS, "--adapters", f"head={root / 'head'}"], root,
                    "decoder-head").wait_ready()
    try:
        texts = ["good fine great film", "bad awful poor film 3"]
        r = httpx.post(f"{server.url}/classify", json={"model": "head", "input": texts})
        assert r.status_code == 200, r.text
        offline = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.01, enable_adapters=True).classify(
            texts, adapter=AdapterRequest("head", root / "head"))
        assert [d["label"] for d in r.json()["data"]] == [o.label for o in offline] == ["positive", "negative"]
        assert all(abs(a - b) < 1e-5 for d, o in zip(r.json()["data"], offline) for a, b in zip(d["probs"], o.probs))
    finally:
        server.stop()
