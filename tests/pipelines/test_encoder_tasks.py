"""Encoder tasks run from YAML and give what the model gives through the offline encoder API."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.encoder_models import tiny_encoder_path
from tokenloom.llm import LLM
from tokenloom.pipelines import PipelineConfigError, load_pipeline
from tokenloom.pipelines.entities import split_tag

TEXTS = ["Ada Lovelace wrote the first program in London.", "The quick brown fox jumps over the lazy dog.",
         "Paged attention keeps keys and values in blocks."]
BIO = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """head → LLM over a tiny random BERT; the token classifier's labels renamed to BIO tags."""
    ner = tmp_path_factory.mktemp("ner") / "bert-ner"
    shutil.copytree(tiny_encoder_path(tmp_path_factory, "bert-ForTokenClassification"), ner)
    config = json.loads((ner / "config.json").read_text())
    config.update(id2label={str(i): tag for i, tag in BIO.items()}, label2id={tag: i for i, tag in BIO.items()})
    (ner / "config.json").write_text(json.dumps(config))
    paths = {head: tiny_encoder_path(tmp_path_factory, f"bert-{head}")
             for head in ("ForSequenceClassification", "ForQuestionAnswering", "ForMaskedLM")}
    return {head: LLM(str(path), dtype="float32") for head, path in {**paths, "ner": ner}.items()}


@pytest.fixture(scope="module")
def minilm():
    return LLM("all-minilm-l6-v2", dtype="float32")


def test_text_classification_with_a_classifier_head(encoders, write_yaml):
    llm = encoders["ForSequenceClassification"]
    pipe = load_pipeline(write_yaml("task: text-classification\n"), llm=llm)
    inputs = [TEXTS[0], {"text": TEXTS[1], "text_pair": TEXTS[2]}]
    got = pipe(inputs)
    want = llm.classify([TEXTS[0], (TEXTS[1], TEXTS[2])])
    for g, w in zip(got, want):
        assert g["label"] == w.label == g["labels"][0]
        assert dict(zip(g["labels"], g["scores"])) == pytest.approx(w.scores)
        assert g["scores"] == sorted(g["scores"], reverse=True)


def test_token_classification_groups_bio_tags_into_entities(encoders, write_yaml):
    llm = encoders["ner"]
    pipe = load_pipeline(write_yaml("task: token-classification\nkeep_tokens: true\n"), llm=llm)
    got = pipe(TEXTS)
    tagged = llm.classify_tokens(TEXTS)
    assert sum(len(g["entities"]) for g in got) > 0
    for text, g, w in zip(TEXTS, got, tagged):
        assert [t["label"] for t in g["tokens"]] == [t.label for t in w.tokens]
        inside = [t for t in w.tokens if t.label != "O"]
        covered = [t for t in inside if any(e["start"] <= t.start and t.end <= e["end"] for e in g["entities"])]
        assert covered == inside  # every tagged token is in an entity ...
        for e in g["entities"]:
            assert e["text"] == text[e["start"]:e["end"]]
            members = [t for t in w.tokens if e["start"] <= t.start and t.end <= e["end"]]
            assert {split_tag(t.label)[1] for t in members} == {e["entity"]}  # ... of its own type only
            assert e["score"] == pytest.approx(sum(t.score for t in members) / len(members))


def test_extractive_question_answering(encoders, write_yaml):
    llm = encoders["ForQuestionAnswering"]
    pipe = load_pipeline(write_yaml("task: question-answering\nmax_answer_len: 5\n"), llm=llm)
    rows = [{"question": "Who wrote the first program?", "context": TEXTS[0]},
            {"question": "What jumps?", "context": TEXTS[1]}]
    got = pipe(rows)
    want = llm.answer([r["question"] for r in rows], [r["context"] for r in rows], max_answer_len=5)
    for g, w, r in zip(got, want, rows):
        assert (g["answer"], g["start"], g["end"]) == (w.answer, w.start, w.end)
        assert g["score"] == pytest.approx(w.score)
        assert r["context"][g["start"]:g["end"]] == g["answer"]


def test_fill_mask_and_a_failing_row(encoders, write_yaml):
    llm = encoders["ForMaskedLM"]
    pipe = load_pipeline(write_yaml("task: fill-mask\ntop_k: 3\n"), llm=llm)
    texts = ["The quick brown [MASK] jumps.", "No mask here.", "[MASK] attention keeps [MASK] in blocks."]
    got = pipe(texts)
    assert got[1]["error"].startswith("fill_mask: ") and "[MASK]" in got[1]["error"]
    want = llm.fill_mask([texts[0], texts[2]], top_k=3)
    for g, w in zip([got[0], got[2]], want):
        assert [[p["token_id"] for p in mask] for mask in g["predictions"]] == \
            [[p.token_id for p in mask] for mask in w.predictions]
        assert [p["score"] for mask in g["predictions"] for p in mask] == \
            pytest.approx([p.score for mask in w.predictions for p in mask], rel=1e-4)  # run alone vs batched
    assert len(got[2]["predictions"]) == 2


def test_feature_extraction_and_sentence_similarity_on_minilm(minilm, write_yaml):
    embed = load_pipeline(write_yaml("task: feature-extraction\nbatch_size: 2\n"), llm=minilm)
    got = embed(TEXTS)
    want = minilm.embed(TEXTS)
    for g, w in zip(got, want):
        assert g["embedding"] == pytest.approx(w.embedding, abs=1e-5)  # batched 2 + 1 vs 3
    similar = load_pipeline(write_yaml("task: sentence-similarity\n"), llm=minilm)
    pairs = [("A man is eating food.", "A man is eating a piece of bread."),
             ("A man is eating food.", "Paged attention keeps keys and values in blocks.")]
    scores = [r["score"] for r in similar(pairs)]
    assert scores == pytest.approx([s.score for s in minilm.score(pairs)], abs=1e-6)
    assert scores[0] > scores[1] + 0.3


def test_an_encoder_task_on_a_generative_model_names_the_model(tiny_llm, write_yaml):
    path = write_yaml("task: token-classification\n")
    with pytest.raises(PipelineConfigError, match=r"line 1: field 'model': task 'token-classification' needs an "
                                                  r"encoder-only model"):
        load_pipeline(path, llm=tiny_llm)
