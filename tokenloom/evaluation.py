"""Standard metrics over predictions and references, computed by the libraries everyone reports with
(sacrebleu, rouge-score, seqeval, scikit-learn), and perplexity of a model over a text with a sliding
window (each token scored once, with up to `window - 1` tokens of context, as in transformers' guide).

The metric libraries are the `eval` extra (`pip install tokenloom[eval]`); a missing one is named in the
error. Every metric is in [0, 100] for BLEU (sacrebleu's scale) and [0, 1] for the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenloom.llm import LLM
    from tokenloom.pipelines import Pipeline


class MetricError(ValueError):
    """A metric cannot be computed on these inputs; the message names the metric and the problem."""


def _need(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MetricError(f"this metric needs the {package!r} package: pip install 'tokenloom[eval]'") from exc


def _check_pairs(name: str, predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise MetricError(f"{name}: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise MetricError(f"{name}: no predictions to score")


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenization, exponential smoothing), 0-100; a reference may be
    one string or several."""
    _check_pairs("bleu", predictions, references)
    sacrebleu = _need("sacrebleu", "sacrebleu")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    width = max(len(r) for r in refs)
    # sacrebleu wants one stream per reference position; rows with fewer references pad with None.
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge(predictions: Sequence[str], references: Sequence[str],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum")) -> dict[str, float]:
    """Mean ROUGE F-measures (rouge-score, with Porter stemming), one per type."""
    _check_pairs("rouge", predictions, references)
    scorer = _need("rouge_score.rouge_scorer", "rouge-score").RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for pred, ref in zip(predictions, references):
        for kind, score in scorer.score(ref, pred).items():
            totals[kind] += score.fmeasure
    return {kind: total / len(predictions) for kind, total in totals.items()}


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Fraction of exact matches (scikit-learn's accuracy_score)."""
    _check_pairs("accuracy", predictions, references)
    metrics = _need("sklearn.metrics", "scikit-learn")
    return float(metrics.accuracy_score(list(references), list(predictions)))


def f1(predictions: Sequence[Any], references: Sequence[Any], average: str = "macro") -> float:
    """F1 of labels (scikit-learn, `average` macro/micro/weighted), or of entities when each prediction is a
    sequence of BIO/IOB2 tags (seqeval, micro over entities, as reported for NER)."""
    _check_pairs("f1", predictions, references)
    if isinstance(references[0], (list, tuple)):
        seqeval = _need("seqeval.metrics", "seqeval")
        for i, (p, r) in enumerate(zip(predictions, references)):
            if len(p) != len(r):
                raise MetricError(f"f1: example {i} has {len(p)} predicted tags but {len(r)} reference tags")
        return float(seqeval.f1_score([list(r) for r in references], [list(p) for p in predictions]))
    metrics = _need("sklearn.metrics", "scikit-learn")
    return float(metrics.f1_score(list(references), list(predictions), average=average, zero_division=0))


METRICS: dict[str, Callable[..., Any]] = {"bleu": bleu, "rouge": rouge, "accuracy": accuracy, "f1": f1}


def evaluate(predictions: Sequence[Any], references: Sequence[Any], metrics: Sequence[str]) -> dict[str, float]:
    """Every named metric of `METRICS` over the pairs, flattened to one name → value map (rouge gives
    rouge1, rouge2, rougeL, rougeLsum)."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise MetricError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)} (perplexity is "
                          "computed from a model: tokenloom eval --perplexity)")
    scores: dict[str, float] = {}
    for name in metrics:
        value = METRICS[name](predictions, references)
        scores.update(value if isinstance(value, dict) else {name: value})
    return scores


@dataclass(slots=True)
class PerplexityResult:
    """Perplexity over a text: exp(mean negative log-likelihood) of `num_tokens` scored tokens."""

    perplexity: float
    mean_nll: float
    num_tokens: int
    num_windows: int


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window: windows of `window` tokens every `stride`; each
    window scores the tokens the previous one did not, so every token from the second on is scored once."""
    if window < 2 or not 1 <= stride < window:  # windows overlap by a token at least: it is the context
        raise MetricError(f"perplexity: need window >= 2 and 1 <= stride < window; got window {window}, "
                          f"stride {stride}")
    spans, scored_to = [], 1  # the first token has no context: it is never scored
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        if end > scored_to:
            spans.append((begin, end, max(scored_to, begin + 1)))
            scored_to = end
        if end == num_tokens:
            break
    return spans


def perplexity(llm: LLM, text: str | Sequence[int], window: int | None = None, stride: int | None = None
               ) -> PerplexityResult:
    """Perplexity of `llm`'s model over `text` (or token ids): windows of `window` tokens (default: the
    context length), every `stride` (default: half a window), all windows scored in one batch."""
    from tokenloom.sampling_params import SamplingParams

    ids = list(text) if not isinstance(text, str) else llm.get_tokenizer().encode(text)
    if len(ids) < 2:
        raise MetricError(f"perplexity: the text has {len(ids)} tokens; at least 2 are needed")
    window = window or llm.engine.max_model_len - 1
    spans = sliding_windows(len(ids), window, stride or max(window // 2, 1))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([ids[b:e] for b, e, _ in spans], params, use_tqdm=False)
    nll, count = 0.0, 0
    for (begin, end, first), out in zip(spans, outputs):
        for pos in range(first, end):
            nll -= out.prompt_logprobs[pos - begin][ids[pos]].logprob
            count += 1
    return PerplexityResult(math.exp(nll / count), nll / count, count, len(spans))


@dataclass(slots=True)
class EvalReport:
    """A pipeline's scores on labelled rows; failed rows count as empty predictions (and are counted)."""

    scores: dict[str, float]
    num_rows: int
    num_failed: int
    predictions: list[Any]


def entity_tags(entities: Sequence[dict[str, Any]], length: int) -> list[str]:
    """Character-level IOB2 tags of entity spans ({"entity", "start", "end"}), so seqeval scores spans."""
    tags = ["O"] * length
    for e in sorted(entities, key=lambda e: e["start"]):
        start, end = int(e["start"]), min(int(e["end"]), length)
        if start < end:
            tags[start] = f"B-{e['entity']}"
            tags[start + 1:end] = [f"I-{e['entity']}"] * (end - start - 1)
    return tags


def prediction_of(result: dict[str, Any], field: str | None) -> Any:
    """What a pipeline row predicted: `field` when given, else its label, answer, entities or text."""
    if field is not None:
        return result.get(field)
    for key in ("label", "answer", "entities", "text"):
        if key in result:
            return result[key]
    return None


def evaluate_pipeline(pipe: Pipeline, rows: Sequence[dict[str, Any]], metrics: Sequence[str],
                      reference_field: str = "reference", prediction_field: str | None = None) -> EvalReport:
    """Run `pipe` over labelled rows (each row's `reference_field` holds the expected output; the rest is
    the pipeline's input) and score it. Entity references ({"entity", "start", "end"} lists) are scored
    as spans through seqeval; `perplexity` is the pipeline model's over the reference texts."""
    missing = [i for i, row in enumerate(rows) if reference_field not in row]
    if missing:
        raise MetricError(f"rows {missing[:5]} have no {reference_field!r} field (the expected output)")
    inputs = [{k: v for k, v in row.items() if k != reference_field} for row in rows]
    references = [row[reference_field] for row in rows]
    results = pipe(inputs)
    failed = sum("error" in r for r in results)
    predictions = [None if "error" in r else prediction_of(r, prediction_field) for r in results]
    scores: dict[str, float] = {}
    wanted = [m for m in metrics if m != "perplexity"]
    if wanted:
        preds, refs = _comparable(predictions, references, inputs)
        scores.update(evaluate(preds, refs, wanted))
    if "perplexity" in metrics:
        texts = [r for r in references if isinstance(r, str) and r]
        if not texts:
            raise MetricError("perplexity needs text references")
        ids = [t for text in texts for t in pipe.llm.get_tokenizer().encode(text)]
        scores["perplexity"] = perplexity(pipe.llm, ids).perplexity
    return EvalReport(scores, len(rows), failed, predictions)


def _comparable(predictions: list[Any], references: list[Any], inputs: list[dict[str, Any]]
                ) -> tuple[list[Any], list[Any]]:
    """Predictions and references in the form the metrics take: entity lists become character tags."""
    if references and isinstance(references[0], list) and references[0] and isinstance(references[0][0], dict):
        lengths = [len(str(item.get("text", ""))) for item in inputs]
        return ([entity_tags(p or [], n) for p, n in zip(predictions, lengths)],
                [entity_tags(r, n) for r, n in zip(references, lengths)])
    return ["" if p is None else p for p in predictions], references


def format_table(report: EvalReport) -> str:
    """The scores as a two-column text table."""
    width = max([len(name) for name in report.scores] + [6])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ---------"]
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in report.scores.items()]
    lines.append(f"({report.num_rows} rows, {report.num_failed} failed)")
    return "\n".join(lines)
