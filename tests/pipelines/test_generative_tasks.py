"""Generative tasks run from YAML and give exactly what the model gives through the offline API for the
prompt the task should build (written out by hand here, not through the pipeline's templates)."""

from __future__ import annotations

import pytest

from tokenloom.pipelines import load_pipeline, pipeline
from tokenloom.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0)


def texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def test_text_generation_with_few_shot_template_from_yaml(tiny_models, tiny_llm, write_yaml):
    path = write_yaml(f"""
        task: text-generation
        model: {tiny_models['llama']}
        engine: {{dtype: float32, kv_cache_gib: 0.02, num_threads: 1}}
        template: "{{% for ex in examples %}}{{{{ ex.text }}}} -> {{{{ ex.out }}}}\\n{{% endfor %}}{{{{ text }}}} ->"
        examples:
          - {{text: The quick fox, out: jumps}}
          - {{text: Hello, out: world}}
        sampling: {{temperature: 0, max_tokens: 6}}
        batch_size: 2
        """)
    pipe = load_pipeline(path)
    inputs = ["Paged attention", "Numbers", "café"]
    got = pipe(inputs)
    prompts = [f"The quick fox -> jumps\nHello -> world\n{t} ->" for t in inputs]
    want = texts(tiny_llm.generate(prompts, SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False))
    assert [g["text"] for g in got] == want
    assert any(want)


def test_chat_uses_the_models_chat_template(tiny_llm, write_yaml):
    pipe = load_pipeline(write_yaml("""
        task: chat
        system: Be brief.
        sampling: {temperature: 0, max_tokens: 8}
        """), llm=tiny_llm)
    conversations = [[{"role": "user", "content": "Hello world"}],
                     [{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And Germany?"}]]
    got = pipe([{"messages": c} for c in conversations] + ["The quick brown fox"])
    with_system = [[{"role": "system", "content": "Be brief."}, *c] for c in
                   conversations + [[{"role": "user", "content": "The quick brown fox"}]]]
    want = texts(tiny_llm.chat(with_system, SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False))
    assert [g["text"] for g in got] == want


def test_summarization_prompt_on_gemma(gemma, write_yaml):
    pipe = load_pipeline(write_yaml("""
        task: summarization
        sampling: {max_tokens: 24}
        """), llm=gemma)
    docs = ["The city council met on Tuesday to discuss the new park. After hours of debate, they voted to "
            "approve the budget for construction, which will begin next spring.",
            "Researchers found that cats sleep for up to sixteen hours a day, mostly during daylight."]
    got = pipe(docs)
    want = texts(gemma.generate([f"Text: {d}\nSummary:" for d in docs],
                                SamplingParams(max_tokens=24, stop=["\n"], **GREEDY), use_tqdm=False))
    assert [g["text"] for g in got] == want
    assert all(w.strip() for w in want)


def test_translation_prompt_names_both_languages(tiny_llm, write_yaml):
    pipe = load_pipeline(write_yaml("""
        task: translation
        source_language: English
        target_language: German
        examples: [{text: Hello, translation: Hallo}]
        sampling: {max_tokens: 6}
        """), llm=tiny_llm)
    got = pipe(["The quick brown fox", "Hello world!"])
    prompts = [f"Translate English to German.\n\nEnglish: Hello\nGerman: Hallo\n\nEnglish: {t}\nGerman:"
               for t in ("The quick brown fox", "Hello world!")]
    want = texts(tiny_llm.generate(prompts, SamplingParams(max_tokens=6, stop=["\n"], **GREEDY), use_tqdm=False))
    assert [g["text"] for g in got] == want


def test_generative_question_answering_on_gemma(gemma, write_yaml):
    pipe = load_pipeline(write_yaml("""
        task: question-answering
        examples:
          - context: The sky was grey over Paris.
            question: What colour was the sky?
            answer: grey
        """), llm=gemma)
    rows = [{"question": "Who wrote the book?", "context": "The book was written by Maria Lopez in 1990."},
            {"question": "Where do penguins live?", "context": "Most penguins live in the Southern Hemisphere."}]
    got = pipe(rows)
    prompts = ["Answer the question from the context.\n\nContext: The sky was grey over Paris.\n"
               "Question: What colour was the sky?\nAnswer: grey\n\n"
               f"Context: {r['context']}\nQuestion: {r['question']}\nAnswer:" for r in rows]
    raw = texts(gemma.generate(prompts, SamplingParams(max_tokens=32, stop=["\n"], **GREEDY), use_tqdm=False))
    for g, r, row in zip(got, raw, rows):
        assert g["text"] == r
        assert g["answer"] == r.strip().strip(" \t\n\"'.")
        if g["start"] is not None:
            assert row["context"][g["start"]:g["end"]] == g["answer"]
    assert (got[0]["answer"], got[0]["start"], got[0]["end"]) == ("Maria Lopez", 24, 35)


def test_zero_shot_classification_is_the_argmax_of_label_logprobs(gemma, write_yaml):
    labels = ["positive", "negative", "neutral"]
    pipe = load_pipeline(write_yaml("""
        task: text-classification
        labels: [positive, negative, neutral]
        batch_size: 8
        """), llm=gemma)
    docs = ["I loved this movie, it was wonderful!", "Terrible, boring film. I want my money back."]
    got = pipe(docs)
    tok = gemma.get_tokenizer()
    for doc, result in zip(docs, got):
        prompt = tok.encode(f"Classify the text as one of: positive, negative, neutral.\n\nText: {doc}\nLabel:")
        sums = {}
        for label in labels:
            label_ids = tok.encode(" " + label, add_special_tokens=False)
            out = gemma.generate([prompt + label_ids], SamplingParams(prompt_logprobs=0, max_tokens=1),
                                 use_tqdm=False)[0]
            sums[label] = sum(out.prompt_logprobs[len(prompt) + j][t].logprob for j, t in enumerate(label_ids))
        assert result["label"] == max(sums, key=sums.get)
        assert result["logprobs"] == pytest.approx(sorted(sums.values(), reverse=True), abs=1e-3)
        assert sum(result["scores"]) == pytest.approx(1.0)
    assert [r["label"] for r in got] == ["positive", "negative"]


def test_chunked_input_joins_the_chunks_outputs(tiny_llm):
    pipe = pipeline("summarization", tiny_llm, template="{{ text }} =", chunk_tokens=8,
                    sampling={"max_tokens": 4, "stop": None})
    text = "Paged attention keeps keys and values in fixed-size blocks; continuous batching fills them."
    item = {"text": text}
    for _, step in pipe.steps[:2]:
        step.run([item], pipe.context)
    assert len(item["chunks"]) > 2 and "".join(item["chunks"]) == text
    assert all(len(tiny_llm.get_tokenizer().encode(c, add_special_tokens=False)) <= 9 for c in item["chunks"])
    want = texts(tiny_llm.generate([c + " =" for c in item["chunks"]], SamplingParams(max_tokens=4, **GREEDY),
                                   use_tqdm=False))
    assert pipe([text])[0]["text"] == "\n".join(want)


def test_a_prompt_too_long_fails_only_its_row(tiny_llm):
    pipe = pipeline("text-generation", tiny_llm, sampling={"temperature": 0, "max_tokens": 4})
    long = "The quick brown fox jumps over the lazy dog. " * 40
    got = pipe(["Hello world", long, "Numbers 0123"])
    assert got[1]["error"].startswith("generate: InvalidRequestError: prompt has")
    assert "context length is 128" in got[1]["error"] and "text" not in got[1]
    want = texts(tiny_llm.generate(["Hello world", "Numbers 0123"], SamplingParams(max_tokens=4, **GREEDY),
                                   use_tqdm=False))
    assert [got[0]["text"], got[2]["text"]] == want


@pytest.mark.parametrize("task", ["summarization", "translation"])
def test_encoder_decoder_models_read_the_plain_input(task, tiny_seq2seq_models, write_yaml):
    from tokenloom.llm import LLM

    llm = LLM(str(tiny_seq2seq_models["bart"]), dtype="float32", kv_cache_gib=0.02, num_threads=1)
    pipe = load_pipeline(write_yaml(f"task: {task}\nsampling: {{max_tokens: 6, stop: null}}\n"), llm=llm)
    inputs = ["The quick brown fox", "Hello world! Numbers 0123"]
    want = texts(llm.generate(inputs, SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False))
    assert [g["text"] for g in pipe(inputs)] == want
    assert any(want)


def test_beam_search_replaces_the_tasks_inference_step(tiny_llm, write_yaml):
    from tokenloom.sampling_params import BeamSearchParams

    pipe = load_pipeline(write_yaml("""
        task: translation
        target_language: German
        inference: {beam_search: {beam_width: 3, max_tokens: 5, length_penalty: 0.5}}
        """), llm=tiny_llm)
    assert [name for name, _ in pipe.steps] == ["prompt", "beam_search"]
    inputs = ["The quick brown fox", "Hello world!"]
    got = pipe(inputs)
    want = tiny_llm.beam_search([f"Translate English to German.\n\nEnglish: {t}\nGerman:" for t in inputs],
                                BeamSearchParams(3, 5, length_penalty=0.5))
    for g, w in zip(got, want):
        assert g["text"] == w.sequences[0].text
        assert g["texts"] == [s.text for s in w.sequences] and g["scores"] == [s.score for s in w.sequences]


def test_zero_shot_scoring_refuses_an_encoder_decoder_model(tiny_seq2seq_models):
    from tokenloom.llm import LLM
    from tokenloom.pipelines import PipelineError

    llm = LLM(str(tiny_seq2seq_models["t5"]), dtype="float32", kv_cache_gib=0.02, num_threads=1)
    with pytest.raises(PipelineError, match="model: zero-shot classification scores labels with a decoder-only"):
        pipeline("text-classification", llm, labels=["a", "b"])
