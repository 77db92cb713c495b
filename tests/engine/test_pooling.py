"""The pooling engine and the offline encoder API: batching, limits, failures, and every task's output."""

from __future__ import annotations

import random

import pytest
import torch

from tests.encoder_models import SENTENCES, hf_reference, minilm_path, tiny_encoder_path
from tokenloom.engine.pooling import PoolingParams
from tokenloom.engine.pooling_outputs import best_span, problem_type
from tokenloom.llm import LLM

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "paged", "attention", "keeps",
         "keys", "and", "values", "in", "blocks", "continuous", "batching", "café", "naïve", "résumé", "中文", "🙂",
         "0123456789"]


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """name → LLM over a tiny random encoder (see tests/encoder_models.py), cached."""
    cache: dict[tuple, LLM] = {}

    def make(name: str, **options) -> LLM:
        key = (name, *sorted(options.items()))
        if key not in cache:
            cache[key] = LLM(str(tiny_encoder_path(tmp_path_factory, name)), dtype="float32", **options)
        return cache[key]
    return make


@pytest.fixture(scope="module")
def minilm():
    return LLM("all-minilm-l6-v2", dtype="float32", max_num_batched_tokens=1024, max_num_seqs=32)


def test_minilm_embeddings_match_transformers(minilm):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok, ref = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        states = ref(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()  # the model card's mean pooling, then L2 normalization
    expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    got = torch.tensor([o.embedding for o in minilm.embed(SENTENCES)])
    cos = torch.nn.functional.cosine_similarity(got, expected)
    assert cos.min().item() >= 0.9999, cos
    assert got.norm(dim=-1).sub(1).abs().max().item() < 1e-5


def test_minilm_similar_sentences_score_higher(minilm):
    similar = [(SENTENCES[0], SENTENCES[1]), (SENTENCES[3], SENTENCES[6])]
    unrelated = [(SENTENCES[0], SENTENCES[8]), (SENTENCES[3], SENTENCES[9]), (SENTENCES[1], SENTENCES[7])]
    scores = [s.score for s in minilm.score(similar + unrelated)]
    assert min(scores[:2]) > max(scores[2:]) + 0.3, scores


def _texts(n: int, seed: int = 0) -> list[str]:
    """Mixed lengths: 1 to 40 words, and every 50th text over MiniLM's 256-token limit."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(300 if i % 50 == 7 else rng.choice([1, 2, 4, 8, 16, 40])))
            for i in range(n)]


def _hf_logits(path, texts, pairs=None):
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(path)(texts, pairs, padding=True, return_tensors="pt")
    with torch.no_grad():
        return hf_reference(path)(**enc), enc


# ---- batching ----

def test_200_inputs_batched_equal_one_at_a_time(minilm, monkeypatch):
    texts = _texts(200)
    batches: list[list[int]] = []
    forward = minilm.engine.model.forward

    def counting(ids, positions, meta, types=None):
        batches.append(meta.seq_lens)
        return forward(ids, positions, meta, types)
    monkeypatch.setattr(minilm.engine.model, "forward", counting)
    together = torch.tensor([o.embedding for o in minilm.embed(texts, truncate=True)])
    assert 200 / 32 <= len(batches) < 200
    assert all(sum(b) <= 1024 and len(b) <= 32 for b in batches)
    assert {len(b) for b in batches} != {1}
    alone = torch.tensor([minilm.embed(t, truncate=True)[0].embedding for t in texts])
    assert len(batches) > 200
    assert (together - alone).abs().max().item() <= 1e-5
    assert torch.nn.functional.cosine_similarity(together, alone).min().item() >= 0.99999


def test_budget_and_arrival_order(tiny_llm):
    engine = tiny_llm("bert-Model", max_num_batched_tokens=10, max_num_seqs=3).engine
    lens = [4, 4, 3, 2, 1, 1, 1, 1, 40]
    for i, n in enumerate(lens):
        engine.add_request(str(i), engine.from_token_ids(list(range(100, 100 + n))), PoolingParams("embed"))
    steps = []
    while engine.has_unfinished_requests():
        steps.append([r.request_id for r in engine.step()])
    # 4+4 fit, +3 would not; 3+2+1 fill the seq limit; 1+1+1; 40 is over the budget but runs alone
    assert steps == [["0", "1"], ["2", "3", "4"], ["5", "6", "7"], ["8"]]


def test_a_failing_input_does_not_sink_the_batch(tiny_llm, monkeypatch):
    llm = tiny_llm("bert-Model")
    texts = ["one two three", "poison pill here", "four five", "six"]
    good = llm.embed(texts[:1] + texts[2:])
    forward = llm.engine.model.forward
    poison = llm.get_tokenizer().encode("poison", add_special_tokens=False)[0]

    def flaky(ids, *args):
        if bool((ids == poison).any()):
            raise RuntimeError("boom")
        return forward(ids, *args)
    monkeypatch.setattr(llm.engine.model, "forward", flaky)
    results = llm.engine.encode([llm.engine.tokenize(t) for t in texts], "embed")
    assert [r.error is not None for r in results] == [False, True, False, False]
    assert "boom" in results[1].error
    ok = torch.stack([r.data for r in results if r.error is None])
    assert (ok - torch.tensor([g.embedding for g in good])).abs().max().item() <= 1e-6
    with pytest.raises(RuntimeError, match="input 1: RuntimeError: boom"):
        llm.embed(texts)


# ---- limits and wrong kinds ----

def test_long_inputs_are_rejected_or_truncated(tiny_llm):
    llm = tiny_llm("bert-Model")
    long_text = "word " * 300
    with pytest.raises(ValueError, match=r"input 2: input has 302 tokens, more than the model's limit of 128"):
        llm.embed(["short", "also short", long_text])
    out = llm.embed(["short", long_text], truncate=True)
    assert [o.num_prompt_tokens for o in out] == [3, 128] and [o.truncated for o in out] == [False, True]
    engine = llm.engine
    cut = engine.from_token_ids([101] + [2000] * 200 + [102], truncate=True)
    assert len(cut.token_ids) == 128 and cut.token_ids[-1] == 102  # the closing [SEP] is kept
    with pytest.raises(ValueError, match="input 0: token ids must be"):
        llm.embed([[101, 10 ** 9]])
    with pytest.raises(ValueError, match="input 1: input must be a non-empty string"):
        llm.embed(["fine", ""])


def test_minilm_limit_is_the_sentence_transformers_one(minilm):
    assert minilm.engine.max_model_len == 256  # sentence_bert_config.json, below the 512 positions


def test_wrong_kind_of_request_says_what_the_model_supports(tiny_llm, tiny_models, minilm):
    with pytest.raises(ValueError, match="encoder-only model .*supports embed, not generate"):
        minilm.generate("hello")
    with pytest.raises(ValueError, match="does not support classify; it supports: embed"):
        minilm.classify("hello")
    gpt2 = LLM(str(tiny_models["gpt2"]), dtype="float32", kv_cache_gib=0.01)
    assert gpt2.is_generative and gpt2.supported_tasks == ("generate", "chat")
    with pytest.raises(ValueError, match="is generative: it supports generate, chat, not embed"):
        gpt2.embed("hello")
    assert not minilm.is_generative and minilm.supported_tasks == ("embed",)
    assert tiny_llm("bert-ForSequenceClassification").supported_tasks == ("classify",)  # 3 labels: no score
    assert tiny_llm("bert-cross-encoder").supported_tasks == ("classify", "score")
    assert tiny_llm("roberta-ForMaskedLM").supported_tasks == ("fill_mask", "embed")
    assert tiny_llm("distilbert-ForQuestionAnswering").kind == "encoder"


# ---- tasks ----

@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_classify_matches_transformers(tiny_llm, family):
    llm = tiny_llm(f"{family}-ForSequenceClassification")
    texts = ["a happy day", "the lazy dog sleeps all day long", "no"]
    ref, _ = _hf_logits(llm.engine.loaded.path, texts)
    out = llm.classify(texts)
    assert [o.labels for o in out] == [["L0", "L1", "L2"]] * 3
    probs = torch.tensor([o.probs for o in out])
    assert (probs - ref.logits.softmax(-1)).abs().max().item() <= 1e-5
    assert [o.label for o in out] == [f"L{int(i)}" for i in ref.logits.argmax(-1)]
    assert out[0].scores == dict(zip(out[0].labels, out[0].probs))


def test_classify_pairs_use_token_types(tiny_llm):
    llm = tiny_llm("bert-ForSequenceClassification")
    ref, enc = _hf_logits(llm.engine.loaded.path, ["a premise"], ["a hypothesis"])
    assert enc["token_type_ids"].sum() > 0
    with torch.no_grad():  # the same ids with every token type 0: the test can tell the difference
        no_types = hf_reference(llm.engine.loaded.path)(input_ids=enc["input_ids"]).logits
    assert (no_types - ref.logits).abs().max().item() > 1e-4
    pair = llm.classify(("a premise", "a hypothesis"))[0]
    assert pair.logits == pytest.approx(ref.logits[0].tolist(), abs=1e-5)


def test_multi_label_and_cross_encoder(tiny_llm):
    multi = tiny_llm("bert-multi-label")
    ref, _ = _hf_logits(multi.engine.loaded.path, ["some text"])
    assert multi.classify("some text")[0].probs == pytest.approx(ref.logits.sigmoid()[0].tolist(), abs=1e-5)
    cross = tiny_llm("bert-cross-encoder")
    ref, _ = _hf_logits(cross.engine.loaded.path, ["what is a fox", "what is a fox"], ["a fox is an animal", "blue"])
    scores = [s.score for s in cross.score([("what is a fox", "a fox is an animal"), ("what is a fox", "blue")])]
    assert scores == pytest.approx(ref.logits[:, 0].sigmoid().tolist(), abs=1e-5)
    assert cross.classify("x")[0].probs == cross.classify("x")[0].logits  # one label: regression, raw value


def test_problem_type_follows_transformers():
    from transformers import BertConfig

    assert problem_type(BertConfig(num_labels=1)) == "regression"
    assert problem_type(BertConfig(num_labels=4)) == "single_label_classification"
    assert problem_type(BertConfig(num_labels=4, problem_type="multi_label_classification")) == \
        "multi_label_classification"


def test_token_classification(tiny_llm):
    llm = tiny_llm("roberta-ForTokenClassification")
    text = "Paris is the capital of France"
    ref, enc = _hf_logits(llm.engine.loaded.path, [text])
    out = llm.classify_tokens(text)[0]
    tokens = llm.get_tokenizer().convert_ids_to_tokens(enc["input_ids"][0].tolist())
    assert [t.token for t in out.tokens] == tokens[1:-1]  # [CLS] and [SEP] left out
    assert [t.label for t in out.tokens] == [f"L{int(i)}" for i in ref.logits[0, 1:-1].argmax(-1)]
    assert [text[t.start:t.end].lower() for t in out.tokens] == [t.token.removeprefix("##") for t in out.tokens]


def test_best_span_rules():
    start = torch.tensor([0.0, 1.0, 0.0, 0.0, 9.0, 0.0])
    end = torch.tensor([0.0, 0.0, 8.0, 0.0, 0.0, 1.0])
    allowed = torch.tensor([False, True, True, True, True, True])
    s, e, score = best_span(start, end, allowed, 15)
    assert (s, e) == (4, 5)  # end >= start: the high end logit before the high start is not usable
    assert 0 < score < 1
    assert best_span(start, end, allowed, 1)[:2] == (4, 4)  # one token at most
    assert best_span(start, end, torch.tensor([False, True, True, True, False, False]), 15)[:2] == (1, 2)
    with pytest.raises(ValueError, match="no context token"):
        best_span(start, end, torch.zeros(6, dtype=torch.bool), 15)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_question_answering(tiny_llm, family):
    llm = tiny_llm(f"{family}-ForQuestionAnswering")
    question, context = "Where does the fox sleep?", "The quick brown fox sleeps under the old oak tree by the river."
    ref, enc = _hf_logits(llm.engine.loaded.path, [question], [context])
    out = llm.answer(question, context, max_answer_len=4)[0]
    context_ids = torch.tensor([s == 1 for s in enc.sequence_ids(0)])
    expected = best_span(ref.start_logits[0], ref.end_logits[0], context_ids, 4)
    assert (out.start_token, out.end_token) == expected[:2] and out.score == pytest.approx(expected[2], abs=1e-5)
    assert out.end_token - out.start_token < 4 and context[out.start:out.end] == out.answer and out.answer
    assert len(llm.answer(question, [context, "Another context entirely."])) == 2


def test_question_answering_errors(tiny_llm):
    llm = tiny_llm("bert-ForQuestionAnswering")
    with pytest.raises(ValueError, match="got 2 questions for 3 contexts"):
        llm.answer(["a?", "b?"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="input 1: input has .* tokens, more than the model's limit of 128"):
        llm.answer("why?", ["short context", "long " * 200], truncate=False)
    long = llm.answer("why?", "long " * 200)[0]  # truncate=True by default: the context is cut
    assert long.truncated and long.num_prompt_tokens == 128
    with pytest.raises(ValueError, match="input 0: the first text has 203 tokens .* no room for the second"):
        llm.answer("why " * 200, "a context")
    with pytest.raises(ValueError, match="max_answer_len must be >= 1"):
        llm.answer("why?", "a context", max_answer_len=0)


def test_fill_mask_matches_transformers(tiny_llm):
    llm = tiny_llm("bert-ForMaskedLM")
    text = "the [MASK] fox jumps over the [MASK] dog"
    ref, enc = _hf_logits(llm.engine.loaded.path, [text])
    out = llm.fill_mask(text, top_k=3)[0]
    masks = (enc["input_ids"][0] == 103).nonzero().squeeze(1)
    assert len(out.predictions) == 2
    for preds, pos in zip(out.predictions, masks):
        top = ref.logits[0, pos].softmax(-1).topk(3)
        assert [p.token_id for p in preds] == top.indices.tolist()
        assert [p.score for p in preds] == pytest.approx(top.values.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match=r"input 1: no \[MASK\] token"):
        llm.fill_mask([text, "nothing masked here"])


def test_embed_pooling_overrides(tiny_llm):
    llm = tiny_llm("distilbert-Model")
    ref, enc = _hf_logits(llm.engine.loaded.path, ["pool me please"])
    states = ref.last_hidden_state[0]
    default = llm.embed("pool me please")[0].embedding  # no sentence-transformers files: mean, normalized
    assert default == pytest.approx(torch.nn.functional.normalize(states.mean(0), dim=0).tolist(), abs=1e-5)
    cls = llm.embed("pool me please", pooling="cls", normalize=False)[0].embedding
    assert cls == pytest.approx(states[0].tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="pooling mode must be one of"):
        llm.embed("x", pooling="median")


# ---- async front ----

def test_async_callers_share_batches_and_match_offline(tiny_llm, monkeypatch):
    import asyncio

    from tokenloom.engine.async_engine import AsyncEngine, EngineDeadError

    llm = tiny_llm("bert-Model")
    engine = llm.engine
    texts = _texts(12, seed=3)
    expected = torch.tensor([o.embedding for o in llm.embed(texts, truncate=True)])
    batches: list[int] = []
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda ids, pos, meta, types=None: (
        batches.append(meta.num_seqs), forward(ids, pos, meta, types))[1])
    front = AsyncEngine(engine)
    try:
        parts = [[engine.tokenize(t, truncate=True) for t in texts[i:i + 4]] for i in range(0, 12, 4)]
        with front._cond:  # hold the engine thread back so that the three callers arrive together
            futures = [front.submit(p, "embed") for p in parts]
            dropped = front.submit(parts[0], "embed")
            dropped.cancel()
        results = [r for f in futures for r in f.result(timeout=30)]
        assert batches[0] == 12 and sum(batches) == 12  # one batch for three callers; the cancelled one never ran
        assert dropped.cancelled()
        got = torch.stack([r.data for r in results])
        assert (got - expected).abs().max().item() <= 1e-5

        async def call() -> list:
            return await front.encode(parts[1], "embed")
        again = asyncio.run(call())
        assert (torch.stack([r.data for r in again]) - got[4:8]).abs().max().item() <= 1e-5
        with pytest.raises(ValueError, match="does not support classify"):
            front.submit(parts[0], "classify")
    finally:
        front.shutdown()
    with pytest.raises(EngineDeadError):
        front.submit(parts[0], "embed")
