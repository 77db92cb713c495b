"""The offline API's pooling tasks for encoder-only models (mixed into `LLM`): embed, classify, score,
classify_tokens, answer (extractive QA) and fill_mask.

Every input is tokenized and checked before any runs, so a bad one fails the call with its index
named and no work is lost; the rest runs as pooling requests on the engine, in token-budget batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from tokenloom.adapters import AdapterRequest
from tokenloom.engine import pooling_outputs as tasks
from tokenloom.engine.llm_engine import InvalidRequestError, LLMEngine
from tokenloom.engine.pooling import EncoderInput
from tokenloom.models.pooling import with_overrides
from tokenloom.models.registry import ModelKind
from tokenloom.outputs import (
    AnswerOutput,
    ClassificationOutput,
    EmbeddingOutput,
    FillMaskOutput,
    ScoreOutput,
    TokenClassificationOutput,
)

EmbedInput = str | list[int]
TextOrPair = str | tuple[str, str]


class PoolingTasks:
    """Encoder-only tasks of `LLM`; each raises a ValueError naming what the model supports when the
    model cannot do the task (a generative model, or an encoder with another head)."""

    engine: LLMEngine

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        """What the loaded model can do: generate/chat, or some of embed, classify, score,
        token_classify, qa, fill_mask."""
        return self.engine.supported_tasks

    @property
    def kind(self) -> ModelKind:
        """decoder, encoder-decoder or encoder."""
        return self.engine.loaded.kind

    @property
    def is_generative(self) -> bool:
        """True for models that generate text (decoders, encoder–decoders)."""
        return self.kind != "encoder"

    def embed(self, inputs: EmbedInput | Sequence[EmbedInput], *, truncate: bool = False, pooling: str | None = None,
              normalize: bool | None = None, adapter: AdapterRequest | None = None) -> list[EmbeddingOutput]:
        """Sentence embeddings of texts (or token id lists), pooled as the model's sentence-transformers
        config says unless `pooling` (mean, cls, last, max, mean_sqrt_len) or `normalize` override it; with
        `adapter` (a LoRA, soft prompt or prefix), through it."""
        engine = self._encoder("embed")
        items = [inputs] if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else list(inputs)
        config = with_overrides(engine.pooling_config, pooling, normalize)

        def make(item: EmbedInput) -> EncoderInput:
            return engine.tokenize(item, truncate=truncate) if isinstance(item, str) else \
                engine.from_token_ids(item, truncate)
        encoded, data = self._encode_all(engine, items, make, "embed", config, adapter)
        return [EmbeddingOutput(d.tolist(), len(e.token_ids), e.truncated) for e, d in zip(encoded, data)]

    def classify(self, inputs: TextOrPair | Sequence[TextOrPair], *, truncate: bool = False,
                 adapter: AdapterRequest | None = None) -> list[ClassificationOutput]:
        """Label probabilities for texts, or for (text, text_pair) tuples (e.g. NLI premise, hypothesis);
        with `adapter`, through a trained classification head (a PEFT SEQ_CLS adapter: LoRA + classifier,
        e.g. from `tokenloom train --method head`) on a bare encoder, its labels those it was trained with."""
        items = [inputs] if isinstance(inputs, (str, tuple)) else list(inputs)
        if self.kind == "decoder" and adapter is not None:  # a decoder's head reads the last token
            engine = self.engine
            make = partial(_decoder_input, engine)
        else:
            engine = self._encoder("classify", adapter)
            make = partial(_tokenize, engine, truncate=truncate)
        encoded, data = self._encode_all(engine, items, make, "classify", adapter=adapter)
        config = engine.label_config(adapter)
        return [tasks.classification(d, config, e) for e, d in zip(encoded, data)]

    def score(self, text_pairs: tuple[str, str] | Sequence[tuple[str, str]], *, truncate: bool = False
              ) -> list[ScoreOutput]:
        """How well each (a, b) pair matches: a cross-encoder's score (a sequence-classification model
        with one label), else the cosine similarity of the two embeddings."""
        engine = self._encoder("score" if "score" in self.supported_tasks else "embed")
        pairs = [text_pairs] if isinstance(text_pairs, tuple) else list(text_pairs)
        if any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pairs):
            raise InvalidRequestError("score takes (text_a, text_b) pairs")
        if "score" in engine.supported_tasks:
            encoded, data = self._encode_all(engine, pairs, lambda p: _tokenize(engine, tuple(p), truncate), "score")
            config = engine.loaded.hf_config
            return [ScoreOutput(tasks.cross_encoder_score(d, config), len(e.token_ids)) for e, d in zip(encoded, data)]
        vectors = self.embed([t for p in pairs for t in p], truncate=truncate)
        out = []
        for a, b in zip(vectors[::2], vectors[1::2]):
            cos = torch.nn.functional.cosine_similarity(torch.tensor(a.embedding), torch.tensor(b.embedding), dim=0)
            out.append(ScoreOutput(float(cos), a.num_prompt_tokens + b.num_prompt_tokens))
        return out

    def classify_tokens(self, texts: str | Sequence[str], *, truncate: bool = False
                        ) -> list[TokenClassificationOutput]:
        """Per-token labels (NER, POS) with each token's character span in its text."""
        engine = self._encoder("token_classify")
        items = [texts] if isinstance(texts, str) else list(texts)
        encoded, data = self._encode_all(
            engine, items, lambda t: engine.tokenize(t, truncate=truncate, with_offsets=True), "token_classify")
        config, tok = engine.loaded.hf_config, engine.tokenizer
        return [tasks.token_labels(d, config, e, tok) for e, d in zip(encoded, data)]

    def answer(self, questions: str | Sequence[str], contexts: str | Sequence[str], *, max_answer_len: int = 15,
               truncate: bool = True) -> list[AnswerOutput]:
        """The best answer span in each context (extractive QA); a context longer than the model's limit
        is cut at its end unless truncate=False. One question may serve many contexts and vice versa."""
        engine = self._encoder("qa")
        qs = [questions] if isinstance(questions, str) else list(questions)
        cs = [contexts] if isinstance(contexts, str) else list(contexts)
        if len(qs) != len(cs) and 1 not in (len(qs), len(cs)):
            raise InvalidRequestError(f"got {len(qs)} questions for {len(cs)} contexts")
        n = max(len(qs), len(cs))
        qs, cs = (qs * n if len(qs) == 1 else qs), (cs * n if len(cs) == 1 else cs)
        encoded, data = self._encode_all(engine, list(zip(qs, cs)), lambda qc: engine.tokenize(
            qc[0], qc[1], truncate=truncate, with_offsets=True), "qa")
        out = []
        for i, (e, d, c) in enumerate(zip(encoded, data, cs)):
            try:
                out.append(tasks.answer(d, e, c, max_answer_len))
            except ValueError as exc:
                raise InvalidRequestError(f"input {i}: {exc}") from exc
        return out

    def fill_mask(self, texts: str | Sequence[str], *, top_k: int = 5, truncate: bool = False) -> list[FillMaskOutput]:
        """The top_k candidates for each mask token (e.g. [MASK] or <mask>) of each text."""
        engine = self._encoder("fill_mask")
        items = [texts] if isinstance(texts, str) else list(texts)
        mask_id = engine.tokenizer.hf.mask_token_id

        def make(text: str) -> EncoderInput:
            inp = engine.tokenize(text, truncate=truncate)
            if mask_id not in inp.token_ids:
                raise InvalidRequestError(f"no {engine.tokenizer.hf.mask_token} token in the text")
            return inp
        encoded, data = self._encode_all(engine, items, make, "fill_mask")
        return [tasks.fill_mask(d, e, engine.tokenizer, top_k) for e, d in zip(encoded, data)]

    def _encoder(self, task: str, adapter: AdapterRequest | None = None) -> LLMEngine:
        """The pooling engine, if the model can do `task` (or `adapter` brings the head for it)."""
        if self.kind != "encoder":
            name = self.engine.loaded.name
            raise InvalidRequestError(f"model {name} is generative: it supports {', '.join(self.supported_tasks)}, "
                                      f"not {task}; {task} needs an encoder-only model (e.g. all-minilm-l6-v2)")
        if adapter is None:
            self.engine.require(task)
        return self.engine

    def _require_generative(self, what: str) -> None:
        """Raise unless the model generates text."""
        if self.kind == "encoder":
            arch = type(self.engine.model).__name__
            raise InvalidRequestError(f"model {self.engine.loaded.name} is an encoder-only model ({arch}): it "
                                      f"supports {', '.join(self.supported_tasks)}, not {what}")

    @staticmethod
    def _encode_all(engine: LLMEngine, items: list[Any], make: Callable[[Any], EncoderInput], task: str,
                    pooling: Any = None, adapter: AdapterRequest | None = None
                    ) -> tuple[list[EncoderInput], list[torch.Tensor]]:
        """Tokenize every item (errors name its index), run them all, fail if any input failed."""
        encoded = []
        for i, item in enumerate(items):
            try:
                encoded.append(make(item))
            except ValueError as exc:
                raise InvalidRequestError(f"input {i}: {exc}") from exc
        results = engine.encode(encoded, task, pooling, adapter)
        failed = [f"input {i}: {r.error}" for i, r in enumerate(results) if r.error]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(results)} inputs failed; " + "; ".join(failed[:3]))
        return encoded, [r.data for r in results]


def _tokenize(engine: LLMEngine, item: TextOrPair, truncate: bool) -> EncoderInput:
    if isinstance(item, tuple):
        if len(item) != 2:
            raise InvalidRequestError("a text pair must be a (text, text_pair) tuple")
        return engine.tokenize(item[0], item[1], truncate=truncate)
    return engine.tokenize(item, truncate=truncate)


def _decoder_input(engine: LLMEngine, item: TextOrPair) -> EncoderInput:
    """A decoder's classification input: the text's token ids (as a prompt is tokenized)."""
    if not isinstance(item, str):
        raise InvalidRequestError("a decoder classifies texts, not text pairs")
    return EncoderInput(engine.inputs.token_ids(item))
