"""T5 and BART: our models against transformers (fp32), and served by the engine with continuous batching."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SEQ2SEQ_ARCHITECTURES
from tokenloom import SamplingParams
from tokenloom.config import ModelConfig
from tokenloom.engine.kv_cache import KVCacheManager
from tokenloom.engine.llm_engine import InvalidRequestError
from tokenloom.engine.model_runner import ModelRunner
from tokenloom.engine.request import Request
from tokenloom.engine.scheduler import SchedulerOutput
from tokenloom.llm import LLM
from tokenloom.loader import load_model

TEXTS = ["Hello world!", "The quick brown fox jumps over the lazy dog. " * 3, "café",
         "Paged attention keeps keys and values in fixed-size blocks; continuous batching fills them.",
         "user: What is the capital of France?"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# Tiny random models repeat one token; a repetition penalty (applied alike by transformers) varies the paths.
GREEDY_VARIED = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=2.0)


@pytest.fixture(scope="module")
def engines(tiny_seq2seq_models):
    """One fp32 LLM per architecture, shared by this module's tests."""
    return {name: LLM(str(path), dtype="float32", kv_cache_gib=0.01, max_num_batched_tokens=64)
            for name, path in tiny_seq2seq_models.items()}


@pytest.fixture(scope="module")
def hf_seq2seq(tiny_seq2seq_models):
    """The transformers oracle per architecture (loaded once)."""
    from transformers import AutoModelForSeq2SeqLM

    cache = {}

    def load(arch: str) -> torch.nn.Module:
        if arch not in cache:
            cache[arch] = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq_models[arch], dtype=torch.float32,
                                                                attn_implementation="eager").eval()
        return cache[arch]
    return load


def _ids(lengths: tuple[int, ...], eos: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 300, (n - 1,), generator=g).tolist() + [eos] for n in lengths]


def _with_blocks(requests: list[Request], block_size: int = 16) -> list[Request]:
    next_block = 0
    for r in requests:
        n = -(-(r.num_tokens) // block_size)
        r.block_ids = list(range(next_block, next_block + n))
        next_block += n
    return requests


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
def test_encoder_hidden_states_match_transformers(arch, engines, hf_seq2seq):
    model = engines[arch].engine.loaded.model
    prompts = _ids((5, 40, 1, 17, 70), eos=2, seed=0)
    lens = [len(p) for p in prompts]
    with torch.inference_mode():
        hidden = model.encode(torch.tensor(sum(prompts, [])), torch.cat([torch.arange(n) for n in lens]), lens)
    hf = hf_seq2seq(arch)
    offset = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf.get_encoder()(torch.tensor([p])).last_hidden_state[0]
        diff = (hidden[offset:offset + len(p)] - ref).abs().max().item()
        assert diff <= 1e-4, f"{arch}: encoder output for {len(p)} tokens differs by {diff}"
        offset += len(p)


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
def test_decoder_logits_match_transformers(arch, tiny_seq2seq_models, hf_seq2seq):
    """Teacher-forced decoder sequences in three steps: first chunks, chunks that continue cached context,
    then one decode row each; every row's logits against transformers' full forward."""
    # A model of its own: the runner binds its KV cache into the attention layers.
    model = load_model(ModelConfig(str(tiny_seq2seq_models[arch]), dtype="float32"), torch.device("cpu")).model
    runner = ModelRunner(model, num_blocks=32, block_size=16, dtype=torch.float32, device=torch.device("cpu"))
    encoder_inputs = _ids((9, 33, 4, 60), eos=2, seed=1)
    g = torch.Generator().manual_seed(2)
    start = model.decoder_start_token_id
    decoder_inputs = [[start] + torch.randint(4, 300, (n - 1,), generator=g).tolist() for n in (7, 23, 5, 34)]
    steps = [(3, 8, 2, 16), (3, 14, 2, 17), (1, 1, 1, 1)]
    requests = _with_blocks([Request(str(i), d, SamplingParams(), encoder_token_ids=e)
                             for i, (e, d) in enumerate(zip(encoder_inputs, decoder_inputs))])
    hf = hf_seq2seq(arch)
    with torch.no_grad():
        refs = [hf(input_ids=torch.tensor([e]), decoder_input_ids=torch.tensor([d])).logits[0]
                for e, d in zip(encoder_inputs, decoder_inputs)]
    worst = 0.0
    for num_tokens in steps:
        batch = runner._prepare(SchedulerOutput(requests, list(num_tokens)))
        with torch.inference_mode():
            logits = model.compute_logits(model(batch.input_ids, batch.positions, batch.meta))
        offset = 0  # each step has only chunks or only single rows, so the packed order is the request order
        for r, n, ref in zip(requests, num_tokens, refs):
            start_pos = r.num_computed_tokens
            worst = max(worst, (logits[offset:offset + n] - ref[start_pos:start_pos + n]).abs().max().item())
            offset += n
            r.num_computed_tokens += n
    assert worst <= 1e-4, f"{arch}: decoder logits differ by {worst}"
    assert runner.encoder_cache.num_encoded == len(requests)  # encoded once, reused by every step


@pytest.mark.parametrize("params", [GREEDY, GREEDY_VARIED], ids=["greedy", "repetition_penalty"])
@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
def test_greedy_generation_matches_transformers(arch, params, engines, hf_seq2seq):
    llm = engines[arch]
    outs = llm.generate(TEXTS, params, use_tqdm=False)
    hf = hf_seq2seq(arch)
    tok = llm.get_tokenizer()
    for text, out in zip(TEXTS, outs):
        ids = tok.hf(text).input_ids
        assert out.prompt_token_ids == ids and ids[-1] == tok.eos_token_id
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=params.max_tokens, do_sample=False, num_beams=1,
                          eos_token_id=None, repetition_penalty=params.repetition_penalty)[0, 1:].tolist()
        assert out.outputs[0].token_ids == ref, f"{arch}: prompt of {len(ids)} tokens"
        assert out.outputs[0].finish_reason == "length"
    assert llm.engine.runner.encoder_cache.states == {}


def test_t5_prompts_have_no_bos_and_bart_prompts_do(engines):
    t5, bart = engines["t5"].get_tokenizer(), engines["bart"].get_tokenizer()
    assert t5.encode("Hello")[-1] == t5.eos_token_id and t5.bos_token_id is None
    ids = bart.encode("Hello")
    assert ids[0] == bart.bos_token_id and ids[-1] == bart.eos_token_id


def _run_recording_encodes(llm: LLM, prompts, params) -> tuple[list, list[tuple[int, int]]]:
    """Generate, recording each encoder pass as (requests encoded, requests already holding state)."""
    cache = llm.engine.runner.encoder_cache
    calls: list[tuple[int, int]] = []
    encode = cache._encode

    def recording(requests):
        calls.append((len(requests), len(cache.states)))
        encode(requests)
    cache._encode = recording
    try:
        return llm.generate(prompts, params, use_tqdm=False), calls
    finally:
        del cache._encode


@pytest.mark.parametrize("arch", ["t5_gated", "bart"])
def test_concurrent_requests_equal_requests_run_alone(arch, tiny_seq2seq_models):
    # A small budget: encoder inputs are charged to it, so requests are admitted over several steps while
    # earlier ones decode, and the 60-token input only runs in a step of its own.
    llm = LLM(str(tiny_seq2seq_models[arch]), dtype="float32", kv_cache_gib=0.01, max_num_batched_tokens=24)
    prompts = _ids((3, 9, 30, 12, 60, 5, 21), eos=2, seed=3)
    params = [GREEDY_VARIED if i % 2 else SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=20,
                                                         ignore_eos=True) for i in range(len(prompts))]
    together, calls = _run_recording_encodes(llm, prompts, params)
    alone = [llm.generate([p], q, use_tqdm=False)[0] for p, q in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert sum(n for n, _ in calls) == len(prompts) and len(calls) > 2
    assert any(running for _, running in calls), "no request was encoded while others were decoding"
    assert llm.engine.runner.encoder_cache.states == {}


def test_preemption_frees_and_recomputes_encoder_state(tiny_seq2seq_models):
    path = str(tiny_seq2seq_models["t5"])
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=2.0)
    prompts = _ids((8, 20, 14, 30, 6, 11), eos=1, seed=4)
    roomy = LLM(path, dtype="float32", kv_cache_gib=0.01)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    block_bytes = 2 * 2 * 4 * 16 * 16 * 4  # layers x (k, v) x heads x head_dim x block_size x fp32
    tight = LLM(path, dtype="float32", kv_cache_gib=12 * block_bytes / 2**30)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    cache = tight.engine.runner.encoder_cache
    assert cache.num_encoded > len(prompts) and cache.states == {}


def test_abort_and_finish_release_encoder_state(engines):
    engine = engines["bart"].engine
    cache = engine.runner.encoder_cache
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("a", _ids((12,), 2, 5)[0], long)
    engine.add_request("b", _ids((7,), 2, 6)[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.add_request("c", _ids((9,), 2, 7)[0], long)
    engine.step()
    assert set(cache.states) == {"a", "b", "c"} and cache.num_bytes > 0
    engine.abort_request("a")
    assert set(cache.states) == {"b", "c"}
    for _ in range(3):
        engine.step()
    assert set(cache.states) == {"c"}  # b finished at max_tokens
    engine.abort_request("c")
    assert cache.states == {} and not engine.has_unfinished_requests()


def test_logprobs_match_transformers(engines, hf_seq2seq):
    llm = engines["t5_gated"]
    ids = llm.get_tokenizer().encode(TEXTS[3])
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    ref = hf_seq2seq("t5_gated").generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                          output_logits=True, return_dict_in_generate=True)
    assert out.token_ids == ref.sequences[0, 1:].tolist()
    for token, lp, logits in zip(out.token_ids, out.logprobs, ref.logits):
        expected = logits[0].float().log_softmax(-1)
        assert len(lp) >= 3 and abs(lp[token].logprob - expected[token].item()) <= 1e-4


def test_sampling_features_work_as_for_decoders(engines):
    llm = engines["bart"]
    ids = _ids((15,), 2, 8)[0]
    seeded = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    first, again = (llm.generate([ids], seeded, use_tqdm=False)[0] for _ in range(2))
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1 and all(len(c.token_ids) == 12 for c in first.outputs)
    # EOS comes from the tokenizer; min_tokens holds it back, a logit bias then forces it.
    eos = llm.get_tokenizer().eos_token_id
    forced = llm.generate([ids], SamplingParams(temperature=0, max_tokens=10, min_tokens=3, logit_bias={eos: 100.0}),
                          use_tqdm=False)[0].outputs[0]
    assert forced.token_ids[-1] == eos and len(forced.token_ids) == 4 and forced.finish_reason == "stop"
    text = llm.generate([ids], GREEDY_VARIED, use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = llm.generate([ids], SamplingParams(**{**_fields(GREEDY_VARIED), "stop": [stop]}), use_tqdm=False)[0]
    assert cut.outputs[0].text == text[:text.index(stop)] and cut.outputs[0].finish_reason == "stop"


def _fields(params: SamplingParams) -> dict:
    return {k: getattr(params, k) for k in ("temperature", "max_tokens", "ignore_eos", "repetition_penalty")}


def test_encoder_input_longer_than_the_model_takes_is_rejected(engines):
    with pytest.raises(InvalidRequestError, match="encoder takes at most 256"):
        engines["bart"].generate([[5] * 300], GREEDY, use_tqdm=False)


def test_prefix_cache_hashes_are_salted_by_the_encoder_input():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    decoder = [0] + list(range(10, 19))

    def computed(salt: int) -> Request:
        r = Request(str(salt), list(decoder), SamplingParams(), cache_salt=salt)
        kv.allocate(r, r.num_tokens)
        r.num_computed_tokens = r.num_tokens
        kv.cache_full_blocks(r)
        return r
    computed(1)
    assert kv.find_cached_prefix(Request("x", list(decoder), SamplingParams(), cache_salt=2)) == []
    assert len(kv.find_cached_prefix(Request("y", list(decoder), SamplingParams(), cache_salt=1))) == 2


def test_t5_without_a_stated_context_length_defaults_to_its_training_length(tiny_seq2seq_models, tmp_path, caplog):
    """T5 has relative positions and no n_positions in transformers' config: 512 by default (logged), and
    max_model_len may raise it."""
    import json
    import shutil

    path = tmp_path / "t5"
    shutil.copytree(tiny_seq2seq_models["t5"], path)
    config = json.loads((path / "config.json").read_text())
    config.pop("n_positions", None)
    (path / "config.json").write_text(json.dumps(config))
    with caplog.at_level("INFO", logger="tokenloom.loader"):
        assert load_model(ModelConfig(model=str(path), dtype="float32"), torch.device("cpu")).max_model_len == 512
    assert "states no context length" in caplog.text
    raised = load_model(ModelConfig(model=str(path), dtype="float32", max_model_len=2048), torch.device("cpu"))
    assert raised.max_model_len == 2048
