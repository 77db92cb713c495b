"""Metrics on fixed inputs with values worked out by hand, and perplexity against transformers on a tiny model
(the real gemma-3-270m is checked in tests/models/test_gemma_gguf.py, beside its transformers reference)."""

from __future__ import annotations

import math

import pytest
import torch

from tokenloom.evaluation import MetricError, accuracy, bleu, evaluate, f1, perplexity, rouge, sliding_windows


def test_bleu_on_known_cases():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["completely unrelated words here"], ["the cat sat on the mat"]) < 5
    # Hand count: "the cat is on the mat" vs ref: 1-4 gram precisions 5/6, 3/5, 1/4, 0/3 (smoothed by
    # sacrebleu's exp method to 1/(2*3)); no brevity penalty.
    p = [5 / 6, 3 / 5, 1 / 4, 1 / 6]
    expected = 100 * math.exp(sum(math.log(x) for x in p) / 4)
    assert bleu(["the cat is on the mat"], ["the cat sat on the mat"]) == pytest.approx(expected, rel=1e-6)
    # A second reference that matches exactly makes it perfect; rows may have different numbers of references.
    two = bleu(["the cat is on the mat", "a dog"], [["the cat sat on the mat", "the cat is on the mat"], "a dog"])
    assert two == pytest.approx(100.0)


def test_rouge_on_a_known_case():
    scores = rouge(["the cat was found under the bed"], ["the cat was under the bed"])
    # ROUGE-1: 6 reference words all matched among 7 predicted: P 6/7, R 1, F 12/13.
    assert scores["rouge1"] == pytest.approx(12 / 13)
    # ROUGE-2: reference bigrams 5, matched 4 (the cat, cat was, under the, the bed): P 4/6, R 4/5.
    assert scores["rouge2"] == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_accuracy_and_f1_on_known_cases():
    preds, refs = ["a", "b", "a", "c"], ["a", "b", "b", "c"]
    assert accuracy(preds, refs) == 0.75
    # macro F1: a P 1/2 R 1 → 2/3; b P 1 R 1/2 → 2/3; c 1 → mean 7/9.
    assert f1(preds, refs) == pytest.approx(7 / 9)
    assert f1(preds, refs, average="micro") == pytest.approx(0.75)


def test_entity_f1_counts_whole_entities():
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    preds = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG"]]
    # Entities: reference {PER 0-1, LOC 3, ORG}, predicted {PER 0-1, ORG 3, ORG}: 2 of 3 right each way.
    assert f1(preds, refs) == pytest.approx(2 / 3)
    with pytest.raises(MetricError, match="example 1 has 1 predicted tags but 2 reference tags"):
        f1([refs[0], ["O"]], refs)


def test_evaluate_names_bad_input():
    assert evaluate(["x"], ["x"], ["accuracy", "rouge"])["rougeL"] == 1.0
    with pytest.raises(MetricError, match="unknown metric\\(s\\) blue; known: bleu, rouge, accuracy, f1"):
        evaluate(["x"], ["x"], ["blue"])
    with pytest.raises(MetricError, match="accuracy: 2 predictions but 1 references"):
        accuracy(["x", "y"], ["x"])


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (10, 4, 3), (11, 5, 3), (3, 8, 4), (100, 16, 1)])
def test_sliding_windows_score_every_token_once(n, window, stride):
    scored = [pos for _, end, first in sliding_windows(n, window, stride) for pos in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in sliding_windows(n, window, stride):
        assert end - begin <= window and begin < first
    with pytest.raises(MetricError, match="1 <= stride < window; got window 4, stride 4"):
        sliding_windows(n, 4, 4)


def test_perplexity_matches_transformers_on_a_tiny_model(tiny_models, hf_reference):
    from tokenloom.llm import LLM

    path = tiny_models["llama"]
    llm = LLM(str(path), dtype="float32", kv_cache_gib=0.02)
    ids = list(range(5, 5 + 90))
    window, stride = 32, 12
    got = perplexity(llm, ids, window=window, stride=stride)
    model = hf_reference(path)
    nll, count = 0.0, 0
    with torch.no_grad():  # the same windows, scored by transformers
        for begin, end, first in sliding_windows(len(ids), window, stride):
            logp = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0], -1)
            for pos in range(first, end):
                nll -= logp[pos - begin - 1, ids[pos]].item()
                count += 1
    assert got.num_tokens == count == len(ids) - 1
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_entity_references_are_scored_as_spans():
    from tokenloom.evaluation import entity_tags

    text = "Ada Lovelace met Babbage in London"
    assert entity_tags([{"entity": "PER", "start": 0, "end": 3}], 6) == ["B-PER", "I-PER", "I-PER", "O", "O", "O"]
    gold = [{"entity": "PER", "start": 0, "end": 12}, {"entity": "PER", "start": 17, "end": 24},
            {"entity": "LOC", "start": 28, "end": 34}]
    pred = [{"entity": "PER", "start": 0, "end": 12}, {"entity": "ORG", "start": 17, "end": 24}]
    n = len(text)
    # one of two predicted spans right (P 1/2), one of three gold spans found (R 1/3): F1 0.4
    assert f1([entity_tags(pred, n)], [entity_tags(gold, n)]) == pytest.approx(0.4)


def test_tokenloom_eval_scores_a_pipeline_on_labelled_rows(tiny_models, tmp_path, capsys):
    import json

    from tokenloom import SamplingParams
    from tokenloom.cli import main
    from tokenloom.llm import LLM

    pipeline = tmp_path / "gen.yaml"
    pipeline.write_text(f"task: text-generation\nmodel: {tiny_models['llama']}\n"
                        "engine: {dtype: float32, kv_cache_gib: 0.02, num_threads: 1}\n"
                        "template: '{{ text }}'\nsampling: {temperature: 0, max_tokens: 8}\n")
    rows = [{"text": "Hello world", "reference": "the quick brown fox"},
            {"text": "Paged attention", "reference": "keeps keys and values in blocks"},
            {"text": "Numbers", "reference": "0123456789"}]
    data = tmp_path / "labeled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(pipeline), "--data", str(data), "--metrics", "bleu,rouge,accuracy,perplexity"]) == 0
    table = capsys.readouterr().out
    assert "rouge1" in table and "perplexity" in table and "(3 rows, 0 failed)" in table
    scores = json.loads((tmp_path / "labeled.scores.json").read_text())["scores"]
    # The same numbers computed here from the model directly.
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kv_cache_gib=0.02, num_threads=1)
    outs = llm.generate([r["text"] for r in rows], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    preds, refs = [o.outputs[0].text for o in outs], [r["reference"] for r in rows]
    assert scores["bleu"] == pytest.approx(bleu(preds, refs))
    assert scores["rougeL"] == pytest.approx(rouge(preds, refs)["rougeL"])
    assert scores["accuracy"] == accuracy(preds, refs)
    ids = [t for r in refs for t in llm.get_tokenizer().encode(r)]
    assert scores["perplexity"] == pytest.approx(perplexity(llm, ids).perplexity, rel=1e-6)


def test_eval_names_bad_data(tiny_models, tmp_path, capsys):
    from tokenloom.cli import main

    pipeline = tmp_path / "gen.yaml"
    pipeline.write_text(f"task: text-generation\nmodel: {tiny_models['llama']}\nengine: {{dtype: float32}}\n")
    data = tmp_path / "labeled.jsonl"
    data.write_text('{"text": "Hello"}\n')
    assert main(["eval", str(pipeline), "--data", str(data)]) == 2
    assert "rows [0] are not JSON objects with a 'reference' field" in capsys.readouterr().err
